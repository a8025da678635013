"""The fresh processes of ``cicada bench first-token``: the peers, the import floor, and
``cicada serve`` with its timelines kept for ``--plot``.

``python -m cicada_async.bench.first_token_peers MODE ...`` lands here. Only the standard
library is imported at module level: what a worker imports is its own, and timed where it says.

**The go protocol** (transformers, download-then-load, tensorizer, llama.cpp's server): the
worker does its imports (torch, transformers and the model's class, our backends, tensorizer,
``llama_cpp`` and its server's FastAPI/uvicorn stack), prints ``{"ready": ...}`` and blocks on
stdin. The driver then drops the weights from the page cache, checks it with mincore, notes the
time and writes ``go``: that instant is "request sent", as for a ``cicada serve`` that is up
with its model unloaded. Every worker reports wall-clock stamps (``time.time()``, the driver's
clock on the same machine); the driver takes differences.

- ``hf transformers``: ``AutoTokenizer`` + ``AutoModelForCausalLM.from_pretrained`` (fp32) +
  ``generate(do_sample=False)`` with a streamer that stamps each new token; a burst of B is one
  batched ``generate`` of the B prompts (its best case: every first token at once).
- ``hf download-then-load``: every file fetched by our backend from the origin (8 MiB ranges,
  8 in flight, written at their offsets as they land, as KServe's storage initializer does),
  then the same as ``transformers`` from that directory.
- ``hf tensorizer``: CoreWeave's tensorizer reads ``model.tensors`` (the same weights in its
  format, serialized once outside every clock) from the same origin with 4 readers; a skeleton
  on meta gets them assigned (buffers that are not in the checkpoint, rotary frequencies, are
  rebuilt); then ``generate`` as above. Config and tokenizer come from the local copy (small).
- ``llama-server``: imports ``llama_cpp.server.__main__``, then at ``go`` runs its ``main``: the
  model (GGUF, mmapped) loads, uvicorn listens, and the driver's requests, sent at ``go`` and
  retried until the port accepts, are answered.
- ``floor``: spawn -> imports (torch, transformers, the class) -> skeleton on meta, the mmapped
  safetensors (page cache warm) assigned -> one prefill of the same batch -> first token
  (argmax). The process-start bench's baseline, for a prefill; no go.
- ``serve``: ``cicada serve`` as the CLI starts it (the prefetch hook first), with each cold
  start's timeline kept (a reference appended when its log line is written) and written as
  JSON at exit (before the server's ``os._exit``). Used only with ``--plot``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

TENSORS = "model.tensors"  # as cicada_async.bench.peers, not imported: it pulls in no torch, but keep this lean


def _ready_then_go() -> None:
    print(json.dumps({"ready": time.time()}), flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go")


def _rebuild_meta_buffers(model: Any, config: Any) -> int:
    """Modules left with buffers on meta (non-persistent ones, not in any checkpoint: Llama's
    rotary inverse frequencies) are rebuilt on the CPU from the config."""
    import torch

    n = 0
    for name, mod in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in mod._buffers.values()) and "Rotary" in type(mod).__name__:
            fresh = type(mod)(config=config)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], fresh)
            n += 1
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers still on meta: {left[:4]}")
    del torch
    return n


def assigned_model(model_dir: Path, state: dict[str, Any]) -> Any:
    """The model's class built on meta, ``state`` assigned, ties restored, buffers rebuilt."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _rebuild_meta_buffers(model, config)
    return model.eval()


def hf_worker(mode: str, model_dir: Path, uri: str, prompts: list[str], batch: int, max_tokens: int,
              threads: int, storage: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    getattr(transformers, arch)  # the class's module imported before the clock
    transformers.AutoTokenizer  # noqa: B018 - likewise the tokenizer classes
    transformers.PreTrainedTokenizerFast  # noqa: B018
    if mode == "download-then-load":
        import backends  # noqa: F401

        from cicada_async.bench.peers import _download
    if mode == "tensorizer":
        from tensorizer import TensorDeserializer
        from tensorizer.stream_io import open_stream

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.t: list[float] = []
            self.first = True

        def put(self, value: Any) -> None:
            if self.first:  # the prompt comes first
                self.first = False
                return
            self.t.append(time.time())

        def end(self) -> None:
            pass

    _ready_then_go()
    t_go = time.time()
    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cicada-ft-") as tmp:
        src = model_dir
        if mode == "download-then-load":
            import asyncio

            from cicada_async.bench.origins import model_files

            src = Path(tmp)
            asyncio.run(_download(uri, storage, [f.name for f in model_files(model_dir)], src))
            marks["downloaded"] = time.time()
        tok = transformers.AutoTokenizer.from_pretrained(str(src))
        if mode == "tensorizer":
            kw: dict[str, Any] = {}
            if uri.startswith("s3://"):
                s3 = storage["s3"]
                kw = {"s3_access_key_id": s3["aws_access_key_id"], "s3_secret_access_key": s3["aws_secret_access_key"],
                      "s3_endpoint": s3["endpoint_url"], "force_http": True}
            with open_stream(f"{uri.rstrip('/')}/{TENSORS}", "rb", **kw) as stream:
                state = dict(TensorDeserializer(stream, device="cpu", num_readers=4))
            marks["fetched"] = time.time()
            model = assigned_model(model_dir, state)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        marks["loaded"] = time.time()
        ids = tok([prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt").input_ids
        s = Stamps()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=max_tokens,
                           max_new_tokens=max_tokens, use_cache=True, streamer=s, pad_token_id=tok.eos_token_id)
    return {"t_go": t_go, "first_token_at": [s.t[0]] * batch if s.t else [], "token_stamps": s.t,
            "prompt_tokens": int(ids.shape[1]), "marks": marks, "threads": torch.get_num_threads()}


def floor_worker(model_dir: Path, prompt_tokens: int, batch: int, threads: int) -> dict[str, Any]:
    """Imports + one warm prefill: stamps from inside the fresh process (the driver spawned it)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    getattr(transformers, arch)
    t_imports = time.time()
    state: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    model = assigned_model(model_dir, state)
    vocab = int(model.config.vocab_size)
    ids = torch.tensor([[(i * 7919 + b) % vocab for i in range(prompt_tokens)] for b in range(batch)])
    t_built = time.time()
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        out.logits[:, -1].argmax(-1)
    t_done = time.time()
    return {"t_imports": t_imports, "t_built": t_built, "t_done": t_done, "threads": torch.get_num_threads()}


def llama_server(argv: list[str]) -> None:
    import llama_cpp.server.__main__ as server

    _ready_then_go()
    print(json.dumps({"go": time.time()}), flush=True)
    sys.argv = ["llama_cpp.server", *argv]
    run: Any = getattr(server, "main")  # untyped where installed; the CI's mypy may not have it
    run()


def serve_with_timelines(out: Path, argv: list[str]) -> int:
    """``cicada serve argv`` as ``cicada_async.cli.main`` starts it, keeping its timelines."""
    import atexit

    from cicada_async.engine.prefetch import start_for_cli

    start_for_cli(["serve", *argv])
    from cicada_async.engine.timeline import Timeline
    from cicada_async.service import repository

    kept: list[tuple[str, Timeline]] = []
    log_cold_start = repository.Repository._log_cold_start

    def keep(self: repository.Repository, entry: repository.ModelEntry, ok: bool, wall_s: float) -> None:
        tl = entry.instance.last_timeline
        if isinstance(tl, Timeline):
            kept.append((entry.name, tl))
        log_cold_start(self, entry, ok, wall_s)

    def dump() -> None:
        docs = [{"model": name, **json.loads(tl.to_json())} for name, tl in kept]
        out.write_text(json.dumps(docs))

    repository.Repository._log_cold_start = keep  # type: ignore[method-assign]
    atexit.register(dump)
    # The server leaves by os._exit once drained (server.main): no atexit then, so dump first.
    real_exit = os._exit

    def exit_after_dump(status: int) -> NoReturn:
        dump()
        real_exit(status)

    os._exit = exit_after_dump
    from cicada_async.service.server import main

    return main(argv)


def _main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    if mode == "hf":
        kind, model_dir, uri, prompts, batch, max_tokens, threads, storage = rest
        doc = hf_worker(kind, Path(model_dir), uri, json.loads(prompts), int(batch), int(max_tokens), int(threads),
                        json.loads(storage))
        print(json.dumps(doc), flush=True)
    elif mode == "floor":
        model_dir, n, batch, threads = rest
        print(json.dumps(floor_worker(Path(model_dir), int(n), int(batch), int(threads))), flush=True)
    elif mode == "llama-server":
        llama_server(rest)
    elif mode == "serve":
        return serve_with_timelines(Path(rest[0]), rest[1:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(_main(sys.argv[1:]))
