"""``cicada bench cold-start --storage local,http,s3``: cold starts from remote storage.

Starts its own origins on 127.0.0.1 (``origins.py``: nginx or aiohttp static, s3rver or moto,
a throttling proxy per bandwidth cap) and stops them when done.

Per model, storage and cap it runs side by side, interleaved, each in a fresh process:
- ``cicada``: the engine cold-starting from the remote URI, computing while it fetches;
- ``download-then-load``: the same backend fetches every file of the model to a local temp
  directory, then the best stock local load (``meta-mmap``) answers (what KServe's storage
  initializer or Triton's repository poller do).
With ``local`` in --storage, ``cicada`` and ``meta-mmap`` also run from the local directory
with the page cache dropped.

It also compares raw fetch throughput against the S3 server, uncapped: our S3 backend reading
every weight file into memory, and the Run:ai Model Streamer (``runai-model-streamer``,
``runai-model-streamer-s3``) reading the same objects from the same endpoint.

Reference figures: wire time (bytes / cap) and the warm forward (``cold_start.bound_worker``),
so ``cicada`` can be compared with max(wire time, warm compute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cicada_async.bench.origins import (
    BUCKET,
    model_files,
    start_http_origin,
    start_proxy,
    start_s3,
    upload_s3,
)
from cicada_async.bench.remote_report import format_table, plot

BENCH_SEQ = 128
WORKER_TIMEOUT_S = 600
MB = 1_000_000


# ------------------------------------------------------------------------ workers (fresh processes)


def _remote_settings(kind: str, endpoint: str | None, creds: dict[str, str]) -> dict[str, Any]:
    if kind == "s3":
        return {"endpoint_url": endpoint, "region": "us-east-1", "addressing_style": "path", **creds}
    return {}


def worker(strategy: str, uri: str, local_dir: Path, storage: dict[str, Any]) -> dict[str, Any]:
    """One cold inference in this fresh process; imports happen before the clock starts."""
    import torch  # noqa: F401

    from backends import open_backend, scheme_of
    from cicada_async.bench.strategies import example_inputs, local_spec, meta_mmap
    from cicada_async.engine.modeldir import prepare_imports

    spec = local_spec(local_dir)
    prepare_imports(spec)
    import cicada_async.engine.pipeline
    import cicada_async.engine.runtime  # noqa: F401

    if "://" in uri:
        backend_cls = open_backend(uri, storage.get(scheme_of(uri), {}))  # imports aiobotocore/aiohttp
        asyncio.run(backend_cls.aclose())
    inputs = example_inputs(spec, seq=BENCH_SEQ)
    parts: dict[str, float] = {}
    if strategy == "cicada":
        from cicada_async.engine.runtime import Engine

        async def go() -> dict[str, Any]:
            async with Engine(storage=storage) as eng:
                inst = eng.instance("model", uri)
                t0 = time.perf_counter()
                await inst.infer(inputs)
                total = time.perf_counter() - t0
                tl = inst.last_timeline
                s = tl.summary() if tl is not None else {}
                return {"total_s": total, "summary": {k: v for k, v in s.items() if isinstance(v, (int, float))},
                        "stages": s.get("stages", {})}

        out = asyncio.run(go())
        out["parts"] = out.pop("stages")
        return out
    if strategy == "meta-mmap":
        t0 = time.perf_counter()
        _, parts = meta_mmap(local_dir, spec, inputs, None)
        return {"total_s": time.perf_counter() - t0, "parts": parts}
    if strategy == "download-then-load":
        with tempfile.TemporaryDirectory(prefix="cicada-dl-") as tmp:
            t0 = time.perf_counter()
            nbytes = asyncio.run(_download(uri, storage, [f.name for f in model_files(local_dir)], Path(tmp)))
            parts["download_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            _, p = meta_mmap(Path(tmp), spec, inputs, None)
            parts["load_s"] = time.perf_counter() - t1
            parts.update({f"local_{k}": v for k, v in p.items()})
            total = time.perf_counter() - t0
        return {"total_s": total, "parts": parts, "bytes": nbytes}
    raise SystemExit(f"unknown strategy {strategy!r}")


async def _download(uri: str, storage: dict[str, Any], keys: list[str], dst: Path) -> int:
    """Every file whole, with the same backend (chunked, concurrent), then written to disk."""
    from backends import open_backend, scheme_of

    backend = open_backend(uri, storage.get(scheme_of(uri), {}))
    total = 0
    try:
        async def one(key: str) -> int:
            info = await backend.stat(key)
            buf = bytearray(info.size)
            await backend.read_into(key, 0, memoryview(buf), version=info.version)
            await asyncio.to_thread((dst / key).write_bytes, buf)
            return info.size

        for n in await asyncio.gather(*(one(k) for k in keys)):
            total += n
    finally:
        await backend.aclose()
    return total


def fetch_worker(which: str, endpoint: str, prefix: str, keys: list[str], creds: dict[str, str]) -> dict[str, Any]:
    """Every weight object into memory from S3: our backend, or the Run:ai Model Streamer."""
    if which == "cicada-s3":
        from backends import open_backend

        settings = _remote_settings("s3", endpoint, creds)

        async def go() -> tuple[float, int]:
            backend = open_backend(f"s3://{BUCKET}/{prefix}", settings)
            try:
                await backend.stat(keys[0])  # client creation and connection, outside the clock
                t0 = time.perf_counter()
                infos = await asyncio.gather(*(backend.stat(k) for k in keys))
                bufs = [bytearray(i.size) for i in infos]
                await asyncio.gather(*(backend.read_into(k, 0, memoryview(b), version=i.version)
                                       for k, i, b in zip(keys, infos, bufs)))
                return time.perf_counter() - t0, sum(len(b) for b in bufs)
            finally:
                await backend.aclose()

        elapsed, nbytes = asyncio.run(go())
        return {"seconds": elapsed, "bytes": nbytes, "gbps": nbytes / elapsed / 1e9}
    if which == "runai":
        os.environ.update({
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": creds["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": creds["aws_secret_access_key"], "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            "RUNAI_STREAMER_LOG_LEVEL": "WARNING",
        })
        from runai_model_streamer import SafetensorsStreamer

        held = []
        t0 = time.perf_counter()
        with SafetensorsStreamer() as streamer:
            streamer.stream_files([f"s3://{BUCKET}/{prefix}/{k}" for k in keys])
            for _, tensor in streamer.get_tensors():
                held.append(tensor)
            elapsed = time.perf_counter() - t0
        nbytes = sum(t.numel() * t.element_size() for t in held)
        return {"seconds": elapsed, "bytes": nbytes, "gbps": nbytes / elapsed / 1e9,
                "concurrency": os.environ.get("RUNAI_STREAMER_CONCURRENCY", "default")}
    raise SystemExit(f"unknown fetcher {which!r}")


def _spawn(argv: list[str], timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "cicada_async.bench.remote", *argv],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spawn_bound(model_dir: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "cicada_async.bench.cold_start", "--bound", str(model_dir)],
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"bound worker failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ driver


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def remote_cold_start_bench(args: argparse.Namespace) -> int:
    from cicada_async.bench.cold_start import drop_page_cache
    from cicada_async.models.catalogue import make_model

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    unknown = set(storages) - {"local", "http", "s3"}
    if unknown:
        raise SystemExit(f"--storage: unknown {sorted(unknown)} (local, http, s3)")
    caps = [float(c) for c in str(args.bandwidth_mbps).split(",") if c.strip()]
    remote_kinds = [s for s in storages if s in ("http", "s3")]
    root = Path(args.dir)
    dirs: dict[str, Path] = {}
    for name in models:
        d = root / name
        if not list(d.glob("*.safetensors")):
            print(f"making {name} in {d} ...", flush=True)
            make_model(name, d)
        dirs[name] = d

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "repeat": args.repeat, "caps_mbps": caps, "storages": storages, "servers": {}, "models": {},
        "engine_settings": "Engine() defaults; backend defaults (chunk 8 MiB, concurrency 8)",
    }
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="cicada-bench-remote-") as tmpd:
        tmp = Path(tmpd)
        endpoints: dict[str, str] = {}
        creds: dict[str, str] = {}
        if "http" in remote_kinds:
            (tmp / "nginx").mkdir()
            endpoints["http"], results["servers"]["http"] = start_http_origin(root, tmp / "nginx", stack)
        if "s3" in remote_kinds:
            endpoints["s3"], results["servers"]["s3"], creds = start_s3(tmp, stack)
            print(f"uploading {', '.join(models)} to {results['servers']['s3']} ...", flush=True)
            upload_s3(endpoints["s3"], creds, dirs)
        proxies: dict[tuple[str, float], str] = {}
        for kind in remote_kinds:
            for cap in caps:
                proxies[(kind, cap)] = start_proxy(endpoints[kind], cap * MB, stack)
        print(f"servers: {results['servers']}; proxies: {len(proxies)}", flush=True)

        for name, d in dirs.items():
            weights = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            all_bytes = sum(f.stat().st_size for f in model_files(d))
            bound = _spawn_bound(d)
            entry: dict[str, Any] = {"weights_bytes": weights, "files_bytes": all_bytes,
                                     "warm_forward_s": bound["warm_forward_s"], "skeleton_s": bound["skeleton_s"],
                                     "read_cold_s": bound["read_cold_s"], "configs": {}}
            # Every (storage, cap, strategy) cell, interleaved rep by rep.
            cells: list[tuple[str, float | None, str]] = []
            if "local" in storages:
                cells += [("local", None, "cicada"), ("local", None, "meta-mmap")]
            for kind in remote_kinds:
                for cap in caps:
                    cells += [(kind, cap, "cicada"), (kind, cap, "download-then-load")]
            runs: dict[tuple[str, float | None, str], list[dict[str, Any]]] = {c: [] for c in cells}
            fetch_runs: dict[str, list[dict[str, Any]]] = {"cicada-s3": [], "runai": []}
            for rep in range(args.repeat):
                order = cells[rep % len(cells):] + cells[: rep % len(cells)]
                for kind, cap, strategy in order:
                    drop_page_cache(d)
                    if kind == "local":
                        uri, storage = str(d), {}
                    else:
                        proxy = proxies[(kind, cap)]  # type: ignore[index]
                        uri = f"s3://{BUCKET}/{name}" if kind == "s3" else f"{proxy}/{name}/"
                        storage = {kind: _remote_settings(kind, proxy, creds)}
                    r = _spawn(["--worker", strategy, uri, str(d), json.dumps(storage)])
                    runs[(kind, cap, strategy)].append(r)
                    label = f"{kind}{'' if cap is None else f' @{cap:g} MB/s'}"
                    shown = f"{r['total_s'] * 1e3:8.0f} ms" if "total_s" in r else f"FAILED: {r['error']}"
                    print(f"  {name:10s} {label:16s} {strategy:18s} rep {rep + 1}: {shown}", flush=True)
                if "s3" in remote_kinds:
                    keys = [f.name for f in sorted(d.glob("*.safetensors"))]
                    for which in (("cicada-s3", "runai") if rep % 2 == 0 else ("runai", "cicada-s3")):
                        r = _spawn(["--fetch", which, endpoints["s3"], name, json.dumps(keys), json.dumps(creds)], 300)
                        fetch_runs[which].append(r)
                        shown = f"{r['gbps']:.3f} GB/s" if "gbps" in r else f"FAILED: {r['error']}"
                        print(f"  {name:10s} fetch {results['servers']['s3']} uncapped {which:10s} rep {rep + 1}: {shown}",
                              flush=True)
            for (kind, cap, strategy), rs in runs.items():
                ok = [r for r in rs if "total_s" in r]
                key = kind if cap is None else f"{kind}@{cap:g}"
                cfg = entry["configs"].setdefault(key, {"storage": kind, "cap_mbps": cap, "strategies": {}})
                if cap is not None:
                    cfg["wire_s"] = all_bytes / (cap * MB)
                    cfg["bound_s"] = max(cfg["wire_s"], entry["warm_forward_s"])
                st: dict[str, Any] = {"errors": [r["error"] for r in rs if "error" in r]}
                if ok:
                    st.update(_stats([r["total_s"] for r in ok]))
                    st["parts"] = {k: statistics.median(r["parts"][k] for r in ok if k in r["parts"])
                                   for k in ok[0].get("parts", {})}
                    if "summary" in ok[0]:
                        st["timeline"] = {k: statistics.median(r["summary"][k] for r in ok if k in r["summary"])
                                          for k in ok[0]["summary"]}
                cfg["strategies"][strategy] = st
            for which, rs in fetch_runs.items():
                ok = [r for r in rs if "gbps" in r]
                if rs:
                    entry.setdefault("fetch", {})[which] = {
                        "median_gbps": statistics.median(r["gbps"] for r in ok) if ok else None,
                        "runs_gbps": [r["gbps"] for r in ok], "bytes": ok[0]["bytes"] if ok else None,
                        "errors": [r["error"] for r in rs if "error" in r],
                    }
            results["models"][name] = entry
    # every server and proxy is stopped here
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    png = args.json.with_suffix(".png")
    try:
        plot(results, png)
    except Exception as e:  # noqa: BLE001 - a missing plot must not lose the figures
        print(f"warning: no chart: {e}", file=sys.stderr)
        png = None
    print(format_table(results))
    print(f"\nJSON: {args.json}" + (f"\nchart: {png}" if png else ""))
    return 0


def _main(argv: list[str]) -> int:
    if argv[0] == "--worker":
        print(json.dumps(worker(argv[1], argv[2], Path(argv[3]), json.loads(argv[4]))))
    elif argv[0] == "--fetch":
        print(json.dumps(fetch_worker(argv[1], argv[2], argv[3], json.loads(argv[4]), json.loads(argv[5]))))
    else:
        raise SystemExit("usage: python -m cicada_async.bench.remote --worker|--fetch ...")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
