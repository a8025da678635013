"""The bound of a cold first token, measured in a fresh process in the same run:

    bound = skeleton + max(read, warm prefill of the same batch) + one decode step

- skeleton: the fastest of three builds on meta (``bound.bound_worker``'s way);
- read: local disk, the fastest of ``bound.cold_reads``' methods from a verified-cold page cache
  and of the cell's served cold starts' fetch stages (``local_read_s``);
  a remote cell's read is the wire time, the files' bytes at the link's rate (the driver's);
- warm prefill: the model loaded the meta-mmap way with its page cache warm, one short prefill
  to warm up (it touches every weight), then ``[batch, prompt_tokens]`` with the KV cache on and
  the output head on the last position only (``logits_to_keep=1``, as ``generate`` and cicada),
  the fastest of up to 5 (fewer when one is long: 2 from 2 s, 1 from 10 s);
  where cicada splits the batch (more than ``coldprefill.PREFILL_CHUNK_TOKENS`` tokens), the
  same rows as its forwards are timed too (as many times), and the prefill is the fastest of
  either way (``prefill_batched_s``, ``prefill_chunked_s``);
- one decode step: ``[batch, 1]`` on that cache, timed after each prefill, the fastest.

Fastest, not median: on a shared machine other processes only ever add time, and a bound that
is too high flatters every ratio to it. Torch threads = usable cores, as ``cicada serve``'s.

``python -m cicada_async.bench.first_token_bound MODEL_DIR SHAPES_JSON [--no-read]``
prints one JSON line; SHAPES_JSON is a list of ``[prompt_tokens, batch]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cicada_async.bench.pagecache import warm
from cicada_async.engine.procfs import usable_cores

WARMUP_TOKENS = 8


def _prefill_and_decode(model: Any, n: int, batch: int) -> dict[str, Any]:
    import torch

    from cicada_async.engine.coldprefill import PREFILL_CHUNK_TOKENS, forwards_of

    vocab = int(model.config.vocab_size)
    ids = torch.tensor([[(i * 7919 + b) % vocab for i in range(n)] for b in range(batch)])
    prefills: list[float] = []
    decodes: list[float] = []
    with torch.inference_mode():
        warm_ids = ids[:, :WARMUP_TOKENS]
        out = model(input_ids=warm_ids, use_cache=True)
        model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        while True:
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # the head on the last position, as generate
            nxt = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1].argmax(-1)
            t2 = time.perf_counter()
            prefills.append(t1 - t0)
            decodes.append(t2 - t1)
            first = prefills[0]
            wanted = 5 if first < 2 else 2 if first < 10 else 1
            if len(prefills) >= wanted:
                break
        groups = forwards_of([n] * batch, PREFILL_CHUNK_TOKENS)
        chunked: list[float] = []
        while len(groups) > 1 and len(chunked) < len(prefills):
            t0 = time.perf_counter()
            for g in groups:
                model(input_ids=ids[g], use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
            chunked.append(time.perf_counter() - t0)
    best = min(prefills + chunked)
    return {"prompt_tokens": n, "batch": batch, "prefill_s": best, "decode_step_s": min(decodes),
            "prefill_batched_s": min(prefills), "prefill_chunked_s": min(chunked) if chunked else None,
            "forwards": len(groups), "prefills_s": prefills, "prefills_chunked_s": chunked, "decode_steps_s": decodes}


def bound_worker(model_dir: Path, shapes: list[tuple[int, int]], read: bool) -> dict[str, Any]:
    import torch

    from cicada_async.bench.bound import cold_reads, loaded
    from cicada_async.bench.strategies import local_spec
    from cicada_async.engine.modeldir import prepare_imports
    from cicada_async.engine.skeleton import skeleton_mode

    torch.set_num_threads(usable_cores())
    spec = local_spec(model_dir)
    prepare_imports(spec)
    skeletons = []
    for _ in range(3):
        t0 = time.perf_counter()
        with skeleton_mode():
            spec.build()
        skeletons.append(time.perf_counter() - t0)
    reads = cold_reads(model_dir) if read else {}
    warm(model_dir)
    model = loaded(model_dir, spec)
    return {"skeleton_s": min(skeletons), "skeletons_s": skeletons, **reads, "threads": torch.get_num_threads(),
            "shapes": [_prefill_and_decode(model, n, b) for n, b in shapes]}


def measure(model_dir: Path, shapes: list[tuple[int, int]], read: bool, timeout_s: float = 3600) -> dict[str, Any]:
    """The bound's parts in a fresh process (see the module docstring)."""
    argv = [sys.executable, "-m", "cicada_async.bench.first_token_bound", str(model_dir), json.dumps(shapes)]
    proc = subprocess.run([*argv, *([] if read else ["--no-read"])], capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"bound worker failed: {proc.stderr.strip()[-500:]}")
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


def local_read_s(parts: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> float:
    """A local cell's read: the fastest cold read seen in the run, the bound's own methods (each
    run once, before the cells) and the fetch stage of every ``cicada`` cold start of the cell
    (the same evicted bytes, read the engine's way; ``cicada-spawn`` may prefetch before its load,
    so its fetch stage is not a whole read). One slow sample of the disk otherwise set the bound
    above the servers' own reads: llama-1b's 3.01 s against fetches of 2.18-2.86 s (5a25859)."""
    fetches = [r["cold_start_log"]["timeline"]["stages"]["fetch_s"] for r in runs.get("cicada", [])
               if isinstance(r.get("cold_start_log"), dict) and r["cold_start_log"].get("ok")
               and "fetch_s" in (r["cold_start_log"].get("timeline") or {}).get("stages", {})]
    return float(min([parts["read_cold_s"], *fetches]))


def bound_of(parts: dict[str, Any], n: int, batch: int, read_s: float) -> dict[str, Any]:
    """The bound of one cell from the worker's parts and the cell's read (disk or wire)."""
    shape = next(s for s in parts["shapes"] if s["prompt_tokens"] == n and s["batch"] == batch)
    floor = parts["skeleton_s"] + max(read_s, shape["prefill_s"])
    return {"bound_s": floor + shape["decode_step_s"], "floor_without_decode_s": floor,
            "skeleton_s": parts["skeleton_s"], "read_s": read_s, "prefill_s": shape["prefill_s"],
            "decode_step_s": shape["decode_step_s"]}


if __name__ == "__main__":
    shapes_arg = [(int(n), int(b)) for n, b in json.loads(sys.argv[2])]
    print(json.dumps(bound_worker(Path(sys.argv[1]), shapes_arg, "--no-read" not in sys.argv[3:])))
