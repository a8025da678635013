"""The prefill against the read on shared cores: what overlapping them can reach on this machine.

The first-token bound takes max(read, warm prefill), as if the read cost no CPU. On a CPU-only
host the read's page-cache work runs on the cores the prefill computes on. This measures, in one
fresh process with the model loaded warm: the warm prefill of a batch alone; a cold read of the
model's bytes alone (the engine's way for local files: ``MADV_POPULATE_READ`` on a mapping, 4
readers of 8 MiB, ``bound._parallel_populate``), with the CPU it costs (the process's system
time and the whole machine's busy time from ``/proc/stat``); and the same prefill while that
read runs, started together. The read is of a copy of the weight file on the same disk, evicted
and checked with ``mincore`` before each read (the loaded model maps the original, which stays
warm). Fastest of 3 for the prefill alone; every contended run is kept.

``python -m cicada_async.bench.first_token_contention MODEL_DIR SHAPES_JSON --json OUT``, SHAPES_JSON
a list of ``[prompt_tokens, batch]``; hold the bench lock exclusively.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cicada_async.bench.bound import _parallel_populate
from cicada_async.bench.pagecache import evict_checked, weight_files
from cicada_async.bench.procinfo import commit, machine

REPEAT = 3


def _busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (``/proc/stat``'s cpu line; idle + iowait idle)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def _read(copy: Path) -> dict[str, float]:
    evict_checked(copy)
    hz = os.sysconf("SC_CLK_TCK")
    b0, c0, t0 = _busy_ticks(), os.times(), time.perf_counter()
    _parallel_populate([copy])
    t1, c1, b1 = time.perf_counter(), os.times(), _busy_ticks()
    return {"read_s": t1 - t0, "process_system_cpu_s": c1.system - c0.system,
            "machine_busy_cpu_s": (b1[0] - b0[0]) / hz, "machine_cpu_s": (b1[1] - b0[1]) / hz}


def measure(model_dir: Path, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    import torch

    from cicada_async.bench.bound import loaded
    from cicada_async.bench.strategies import local_spec
    from cicada_async.engine.modeldir import prepare_imports
    from cicada_async.engine.procfs import usable_cores

    torch.set_num_threads(usable_cores())
    spec = local_spec(model_dir)
    prepare_imports(spec)
    model = loaded(model_dir, spec)
    files = weight_files(model_dir)
    copy = model_dir.parent / f".contention-{model_dir.name}.bin"
    with copy.open("wb") as out:  # one file of the same bytes, on the same disk
        for f in files:
            with f.open("rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
        out.flush()
        os.fsync(out.fileno())
    vocab = int(model.config.vocab_size)

    def prefill(ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
        return time.perf_counter() - t0

    doc: dict[str, Any] = {"model": model_dir.name, "bytes": copy.stat().st_size, "threads": torch.get_num_threads()}
    try:
        doc["reads_alone"] = [_read(copy) for _ in range(REPEAT)]
        doc["shapes"] = []
        with torch.inference_mode():
            for n, batch in shapes:
                ids = torch.tensor([[(i * 7919 + b) % vocab for i in range(n)] for b in range(batch)])
                prefill(ids[:, :8])
                alone = [prefill(ids) for _ in range(REPEAT)]
                together = []
                for _ in range(REPEAT):
                    evict_checked(copy)
                    got: dict[str, Any] = {}
                    reader = threading.Thread(target=lambda: got.update(_read_evicted(copy)))
                    reader.start()
                    p = prefill(ids)
                    reader.join()
                    together.append({"prefill_s": p, **got})
                doc["shapes"].append({"prompt_tokens": n, "batch": batch, "prefill_alone_s": min(alone),
                                      "prefills_alone_s": alone, "with_read": together,
                                      "prefill_with_read_median_s": sorted(r["prefill_s"] for r in together)[1]})
    finally:
        copy.unlink()
    return doc


def _read_evicted(copy: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    _parallel_populate([copy])
    return {"read_s": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    model_dir, shapes = Path(argv[0]), [(int(n), int(b)) for n, b in json.loads(argv[1])]
    out = Path(argv[argv.index("--json") + 1])
    doc = {"command": " ".join(["python -m cicada_async.bench.first_token_contention", *argv]), **commit(),
           "machine": machine(), **measure(model_dir, shapes)}
    out.write_text(json.dumps(doc, indent=1))
    for s in doc["shapes"]:
        print(f"{s['prompt_tokens']} x {s['batch']}: prefill alone {s['prefill_alone_s'] * 1000:.0f} ms, "
              f"with a cold read of {doc['bytes'] >> 20} MiB {s['prefill_with_read_median_s'] * 1000:.0f} ms (median); "
              f"read alone {min(r['read_s'] for r in doc['reads_alone']) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
