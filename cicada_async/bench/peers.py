"""One cold start per fresh process, for every strategy of the remote benchmark.

``python -m cicada_async.bench.remote --worker STRATEGY URI LOCAL_DIR STORAGE_JSON`` lands here.
Imports (torch, the model's transformers class, our backends, tensorizer, the Run:ai Model
Streamer) are done before the clock. Every clock starts where loading begins and stops when the
first forward's outputs are on the host (``strategies._forward``'s ``outputs_at``); freeing the
model, the temp directory and the engine come after, outside it.

Strategies:
- ``cicada``: ``Engine(storage=...)`` with ``cicada serve``'s default threads (``strategies.as_served``),
  first ``infer`` on the URI (fetch while computing);
- ``meta-mmap``: parameters on meta, mmapped safetensors assigned, forward (local only);
- ``download-then-load``: our backend (same settings) fetches every file in 8 MiB ranges, 8 in
  flight, each piece written to its offset in a temp file as it lands (``os.pwrite``), as
  KServe's storage initializer streams to its volume; then ``meta-mmap`` from there;
- ``tensorizer``: CoreWeave's tensorizer reads the same weights in its own format
  (``model.tensors`` beside the safetensors, same origin) over HTTP or S3 with 4 readers
  (its faster setting here: issue 11's table), then meta + assign + forward;
- ``runai``: the Run:ai Model Streamer's ``SafetensorsStreamer`` reads the model's safetensors
  (local path or ``s3://``), every tensor held, then meta + assign + forward. Its construction
  is inside the clock: vLLM's Run:ai loader creates the streamer inside ``load_weights``, so
  in real use construction is part of loading. Its tensors are held as yielded (no copy),
  which is the most favourable reading of its output.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

TENSORS = "model.tensors"  # the same weights, in tensorizer's format, beside the safetensors
CHUNK = 8 << 20
IN_FLIGHT = 8
TENSORIZER_READERS = 4


def runai_env(endpoint: str, creds: dict[str, str]) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"], "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "RUNAI_STREAMER_LOG_LEVEL": "WARNING",
    }


def _s3_url(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def worker(strategy: str, uri: str, local_dir: Path, storage: dict[str, Any]) -> dict[str, Any]:
    """One cold inference in this fresh process: total_s from load start to outputs on host."""
    import torch  # noqa: F401

    from backends import open_backend, scheme_of
    from cicada_async.bench.strategies import as_served, example_inputs, local_spec, meta_mmap
    from cicada_async.engine.modeldir import prepare_imports

    spec = local_spec(local_dir)
    prepare_imports(spec)
    import cicada_async.engine.pipeline
    import cicada_async.engine.runtime  # noqa: F401

    remote = "://" in uri
    if remote and strategy in ("cicada", "download-then-load"):
        backend = open_backend(uri, storage.get(scheme_of(uri), {}))  # imports aiobotocore/aiohttp
        asyncio.run(backend.aclose())
    inputs = example_inputs(spec, seq=128)
    weights = list(spec.weight_files)
    if strategy == "cicada":
        from cicada_async.engine.runtime import Engine

        async def go(settings: dict[str, Any]) -> dict[str, Any]:
            async with Engine(**settings) as eng:
                inst = eng.instance("model", uri)
                t0 = time.perf_counter()
                await inst.infer(inputs)
                total = time.perf_counter() - t0
                tl = inst.last_timeline
                s = tl.summary() if tl is not None else {}
                return {"total_s": total, "summary": {k: v for k, v in s.items() if isinstance(v, (int, float))},
                        "parts": s.get("stages", {})}

        with as_served({"storage": storage}) as settings:
            return asyncio.run(go(settings))
    if strategy == "meta-mmap":
        t0 = time.perf_counter()
        _, parts = meta_mmap(local_dir, spec, inputs, None)
        return {"total_s": parts["outputs_at"] - t0, "parts": parts}
    if strategy == "download-then-load":
        from cicada_async.bench.origins import model_files

        with tempfile.TemporaryDirectory(prefix="cicada-dl-") as tmp:
            t0 = time.perf_counter()
            nbytes = asyncio.run(_download(uri, storage, [f.name for f in model_files(local_dir)], Path(tmp)))
            t1 = time.perf_counter()
            _, parts = meta_mmap(Path(tmp), spec, inputs, None)
            parts["download_s"] = t1 - t0
            return {"total_s": parts["outputs_at"] - t0, "parts": parts, "bytes": nbytes}
    if strategy == "tensorizer":
        from tensorizer import TensorDeserializer
        from tensorizer.stream_io import open_stream

        kw: dict[str, Any] = {}
        if uri.startswith("s3://"):
            s3 = storage["s3"]
            kw = {"s3_access_key_id": s3["aws_access_key_id"], "s3_secret_access_key": s3["aws_secret_access_key"],
                  "s3_endpoint": s3["endpoint_url"], "force_http": True}
        path = f"{uri.rstrip('/')}/{TENSORS}"

        def load() -> dict[str, Any]:
            with open_stream(path, "rb", **kw) as stream:
                return dict(TensorDeserializer(stream, device="cpu", num_readers=TENSORIZER_READERS))

        t0 = time.perf_counter()
        _, parts = meta_mmap(local_dir, spec, inputs, None, load=load)
        return {"total_s": parts["outputs_at"] - t0, "parts": parts}
    if strategy == "runai":
        if uri.startswith("s3://"):
            s3 = storage["s3"]
            os.environ.update(runai_env(s3["endpoint_url"], s3))
            paths = [f"{uri.rstrip('/')}/{f}" for f in weights]
        else:
            paths = [str(Path(uri) / f) for f in weights]
        from runai_model_streamer import SafetensorsStreamer

        def load_runai() -> dict[str, Any]:
            with SafetensorsStreamer() as streamer:
                streamer.stream_files(paths)
                return dict(streamer.get_tensors())

        t0 = time.perf_counter()
        _, parts = meta_mmap(local_dir, spec, inputs, None, load=load_runai)
        return {"total_s": parts["outputs_at"] - t0, "parts": parts}
    raise SystemExit(f"unknown strategy {strategy!r}")


async def _download(uri: str, storage: dict[str, Any], keys: list[str], dst: Path) -> int:
    """Every file with our backend, each 8 MiB piece written at its offset as it lands."""
    from backends import open_backend, scheme_of

    backend = open_backend(uri, storage.get(scheme_of(uri), {}))
    gate = asyncio.Semaphore(IN_FLIGHT)
    try:
        infos = await asyncio.gather(*(backend.stat(k) for k in keys))
        fds = {k: os.open(dst / k, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for k in keys}
        try:
            async def piece(key: str, off: int, n: int, version: Any) -> None:
                async with gate:
                    buf = bytearray(n)
                    await backend.read_into(key, off, memoryview(buf), version=version)
                    await asyncio.to_thread(os.pwrite, fds[key], buf, off)

            await asyncio.gather(*(piece(k, off, min(CHUNK, i.size - off), i.version)
                                   for k, i in zip(keys, infos) for off in range(0, i.size, CHUNK)))
        finally:
            for fd in fds.values():
                os.close(fd)
    finally:
        await backend.aclose()
    return sum(i.size for i in infos)
