"""``cicada bench cold-start --storage local,http,s3``: cold starts from remote storage.

Starts its own servers on 127.0.0.1 and stops them when done:
- an HTTP origin: nginx when installed, else an aiohttp static route (in a child process);
- an S3 server: s3rver (``npm install s3rver`` into a cache directory, run with node), or moto
  with a warning when node/npm are missing (moto slices the whole object for every ranged GET,
  so its throughput figures describe moto);
- per bandwidth cap, a throttling TCP proxy (its own process, one token bucket for all
  connections: the cap is on the link) in front of each server.

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

Reference figures: wire time (bytes / cap) and the warm forward (``bench.bound_worker``), so
``cicada`` can be compared with max(wire time, warm compute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

BENCH_SEQ = 128
BUCKET = "cicada-bench"
S3RVER_KEY = "S3RVER"
S3RVER_VERSION = "3.7"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cicada-async"
WORKER_TIMEOUT_S = 600
MB = 1_000_000


# ------------------------------------------------------------------------ throttling proxy


class _Bucket:
    """One token bucket shared by every connection of a proxy: the cap is on the link."""

    def __init__(self, rate_bps: float, burst: int = 256 << 10) -> None:
        self.rate = rate_bps
        self.burst = burst
        self.next_free = 0.0

    async def take(self, n: int) -> None:
        now = time.monotonic()
        # Allow at most `burst` bytes of credit to build up while the link is idle.
        start = max(self.next_free, now - self.burst / self.rate)
        self.next_free = start + n / self.rate
        delay = self.next_free - now
        if delay > 0:
            await asyncio.sleep(delay)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: _Bucket | None) -> None:
    try:
        while True:
            data = await reader.read(64 << 10)
            if not data:
                break
            if bucket is not None:
                await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def _serve_proxy(upstream_host: str, upstream_port: int, rate_bps: float, port_file: Path | None) -> None:
    bucket = _Bucket(rate_bps) if rate_bps > 0 else None

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            cw.close()
            return
        try:
            # Requests go up unthrottled; responses come down through the bucket.
            await asyncio.gather(_pump(cr, uw, None), _pump(ur, cw, bucket))
        finally:
            for w in (uw, cw):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=256)
    port = server.sockets[0].getsockname()[1]
    if port_file is not None:
        port_file.write_text(str(port))
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# ------------------------------------------------------------------------ servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {proc.args} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


_NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def spawn_nginx(nginx: str, root: Path, tmp: Path, port: int) -> subprocess.Popen[bytes]:
    """nginx serving ``root`` on 127.0.0.1:``port`` (ranges, If-Range), state under ``tmp``."""
    conf = tmp / "nginx.conf"
    # As root, nginx workers drop to "nobody", who cannot read 0700 temp dirs.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(_NGINX_CONF.format(user=user, tmp=tmp, port=port, root=root.resolve()))
    return subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_http_origin(root: Path, tmp: Path, stack: ExitStack) -> tuple[str, str]:
    """(base URL, server name): nginx when installed, else aiohttp static in a child process."""
    nginx = find_nginx()
    port = _free_port()
    if nginx:
        proc = spawn_nginx(nginx, root, tmp, port)
        name = "nginx"
    else:
        print("warning: nginx not installed; the HTTP origin is an aiohttp static route", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "cicada_async.bench_remote", "--static", str(root), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        name = "aiohttp-static"
    stack.callback(_stop, proc)
    _wait_port(port, proc)
    return f"http://127.0.0.1:{port}", name


def _s3rver_js() -> Path | None:
    """s3rver from the npm registry, installed once into the cache directory."""
    target = CACHE / "s3rver"
    js = target / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if js.exists():
        return js
    npm, node = shutil.which("npm"), shutil.which("node")
    if not (npm and node):
        return None
    target.mkdir(parents=True, exist_ok=True)
    print(f"installing s3rver@{S3RVER_VERSION} into {target} ...", flush=True)
    r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(target), f"s3rver@{S3RVER_VERSION}"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not js.exists():
        print(f"warning: npm install s3rver failed: {r.stderr.strip()[-300:]}", flush=True)
        return None
    return js


def start_s3(tmp: Path, stack: ExitStack) -> tuple[str, str, dict[str, str]]:
    """(endpoint, server name, credentials): s3rver when node is there, else moto."""
    js = _s3rver_js()
    port = _free_port()
    if js is not None:
        data = tmp / "s3rver-data"
        data.mkdir()
        proc = subprocess.Popen(
            [shutil.which("node") or "node", str(js), "-d", str(data), "-a", "127.0.0.1", "-p", str(port), "-s",
             "--configure-bucket", BUCKET],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        name = "s3rver"
        creds = {"aws_access_key_id": S3RVER_KEY, "aws_secret_access_key": S3RVER_KEY}
    else:
        print("warning: node/npm or s3rver unavailable; using moto, whose ranged GETs slice the whole "
              "object each time: S3 throughput figures will describe moto, not the loaders", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        name = "moto"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    stack.callback(_stop, proc)
    _wait_port(port, proc)
    return f"http://127.0.0.1:{port}", name, creds


def start_proxy(upstream: str, rate_bps: float, stack: ExitStack) -> str:
    host, _, port = upstream.removeprefix("http://").partition(":")
    proc = subprocess.Popen([sys.executable, "-m", "cicada_async.bench_remote", "--proxy", host, port, str(rate_bps)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stack.callback(_stop, proc)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        raise RuntimeError(f"throttling proxy did not start (exit {proc.poll()})")
    _wait_port(int(line), proc)
    return f"http://127.0.0.1:{line}"


def _model_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))


def upload_s3(endpoint: str, creds: dict[str, str], models: dict[str, Path]) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}), **creds)
    try:
        try:
            client.create_bucket(Bucket=BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except Exception as e:  # noqa: BLE001 - s3rver pre-configured it
            if "BucketAlready" not in str(e):
                raise
        for name, d in models.items():
            for f in _model_files(d):
                with open(f, "rb") as fh:
                    client.put_object(Bucket=BUCKET, Key=f"{name}/{f.name}", Body=fh)
    finally:
        client.close()


# ------------------------------------------------------------------------ workers (fresh processes)


def _remote_settings(kind: str, endpoint: str | None, creds: dict[str, str]) -> dict[str, Any]:
    if kind == "s3":
        return {"endpoint_url": endpoint, "region": "us-east-1", "addressing_style": "path", **creds}
    return {}


def worker(strategy: str, uri: str, local_dir: Path, storage: dict[str, Any]) -> dict[str, Any]:
    """One cold inference in this fresh process; imports happen before the clock starts."""
    import torch  # noqa: F401

    from backends import open_backend, scheme_of

    from .strategies import example_inputs, local_spec, meta_mmap, prepare_imports

    spec = local_spec(local_dir)
    prepare_imports(spec)
    from . import engine, pipeline  # noqa: F401

    if "://" in uri:
        backend_cls = open_backend(uri, storage.get(scheme_of(uri), {}))  # imports aiobotocore/aiohttp
        asyncio.run(backend_cls.aclose())
    inputs = example_inputs(spec, seq=BENCH_SEQ)
    parts: dict[str, float] = {}
    if strategy == "cicada":
        from .engine import Engine

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
            nbytes = asyncio.run(_download(uri, storage, [f.name for f in _model_files(local_dir)], Path(tmp)))
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
        proc = subprocess.run([sys.executable, "-m", "cicada_async.bench_remote", *argv],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spawn_bound(model_dir: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "cicada_async.bench", "--bound", str(model_dir)],
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"bound worker failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ driver


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def remote_cold_start_bench(args: argparse.Namespace) -> int:
    from .bench import drop_page_cache
    from .zoo import make_model

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
            all_bytes = sum(f.stat().st_size for f in _model_files(d))
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


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"servers: {results['servers']}; medians of {results['repeat']} runs, each a fresh process",
        "",
        "| model | storage | cap MB/s | wire s | warm fwd s | cicada s | x max(wire, fwd) | download-then-load s | speedup | local meta-mmap s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["models"].items():
        for key, cfg in e["configs"].items():
            s = cfg["strategies"]
            cic = s.get("cicada", {}).get("median_s")
            if cfg["cap_mbps"] is None:
                mm = s.get("meta-mmap", {}).get("median_s")
                lines.append(f"| {name} | local (cold cache) | - | - | {e['warm_forward_s']:.3f} | "
                             f"{_f(cic)} | - | - | - | {_f(mm)} |")
                continue
            dtl = s.get("download-then-load", {}).get("median_s")
            lines.append(
                f"| {name} | {cfg['storage']} | {cfg['cap_mbps']:g} | {cfg['wire_s']:.3f} | {e['warm_forward_s']:.3f} | "
                f"{_f(cic)} | {_f(cic / cfg['bound_s'] if cic else None, 2)} | {_f(dtl)} | "
                f"{_f(dtl / cic if cic and dtl else None, 2)}x | - |"
            )
    fetch_rows = [(n, e["fetch"]) for n, e in results["models"].items() if "fetch" in e]
    if fetch_rows:
        lines += ["", f"Fetch into memory from {results['servers'].get('s3')} (uncapped), GB/s (median):", "",
                  "| model | bytes | cicada S3 backend | Run:ai Model Streamer | ratio |", "|---|---|---|---|---|"]
        for n, f in fetch_rows:
            a = f.get("cicada-s3", {}).get("median_gbps")
            b = f.get("runai", {}).get("median_gbps")
            nbytes = f.get("cicada-s3", {}).get("bytes") or 0
            lines.append(f"| {n} | {nbytes / 1e6:.0f} MB | {_f(a)} | {_f(b)} | {_f(a / b if a and b else None, 2)} |")
    return "\n".join(lines)


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.8 * len(names)), squeeze=False)
    colors = {"cicada": "#ff7f0e", "download-then-load": "#1f77b4", "meta-mmap": "#2ca02c"}
    for ax, name in zip(axes[:, 0], names):
        e = results["models"][name]
        keys = list(e["configs"])
        strategies = ["cicada", "download-then-load", "meta-mmap"]
        width = 0.27
        for j, s in enumerate(strategies):
            xs, ys, errs = [], [], []
            for i, k in enumerate(keys):
                st = e["configs"][k]["strategies"].get(s)
                if st and "median_s" in st:
                    xs.append(i + (j - 1) * width)
                    ys.append(st["median_s"])
                    errs.append([[st["median_s"] - st["min_s"]], [st["max_s"] - st["median_s"]]])
            if xs:
                yerr = [[a[0][0] for a in errs], [a[1][0] for a in errs]]
                ax.bar(xs, ys, width, yerr=yerr, label=s, color=colors[s], capsize=3)
        for i, k in enumerate(keys):
            b = e["configs"][k].get("bound_s")
            if b:
                ax.hlines(b, i - 1.5 * width, i + 1.5 * width, colors="k", linestyles="dashed",
                          label="max(wire, warm forward)" if i == next(
                              n for n, kk in enumerate(keys) if e["configs"][kk].get("bound_s")) else None)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace("@", " @ ") + ("" if "@" not in k else " MB/s") for k in keys])
        ax.set_ylabel("cold start (s), median")
        ax.set_title(f"{name}: cold start to first output ({e['weights_bytes'] / 1e6:.0f} MB weights)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(argv: list[str]) -> int:
    if argv[0] == "--worker":
        print(json.dumps(worker(argv[1], argv[2], Path(argv[3]), json.loads(argv[4]))))
    elif argv[0] == "--fetch":
        print(json.dumps(fetch_worker(argv[1], argv[2], argv[3], json.loads(argv[4]), json.loads(argv[5]))))
    elif argv[0] == "--proxy":
        asyncio.run(_serve_proxy(argv[1], int(argv[2]), float(argv[3]), None))
    elif argv[0] == "--static":
        from aiohttp import web

        app = web.Application()
        app.router.add_static("/", Path(argv[1]), show_index=False)
        web.run_app(app, host="127.0.0.1", port=int(argv[2]), print=None, access_log=None)
    else:
        raise SystemExit("usage: python -m cicada_async.bench_remote --worker|--fetch|--proxy|--static ...")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
