"""Client CPU seconds per GB: one weight file fetched whole from nginx (HTTP) and s3rver (S3).

``python -m cicada_async.bench.client_cpu MODEL_DIR [--repeat 3] [--sweep] [--json PATH]``

Each run is a fresh process with its imports done before the clock; CPU is
``getrusage(RUSAGE_SELF)`` plus ``RUSAGE_CHILDREN`` (tensorizer's HTTP reader runs curl
processes) around the fetch alone. The origin's CPU is not counted. Strategies: our HTTP and
S3 backends on the threaded byte path and on the older event-loop path (``data_path=loop``),
curl, tensorizer's stream reader (its own format, 1 and 4 readers), the Run:ai Model
Streamer (local file and S3) and urllib3 v2 doing our HTTP path's work (issue 24: could the
byte path move onto it). Bytes land in memory each client allocates itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

from cicada_async.bench.origins import BUCKET, start_http_origin, start_s3, upload_s3

KEY = "model.safetensors"
TENSORS = "model.tensors"  # the same weights in tensorizer's format
STRATEGIES = [
    "cicada-http-threads", "cicada-http-threads-prefaulted", "cicada-http-loop", "curl-http",
    "tensorizer-http-1", "tensorizer-http-4",
    "cicada-s3-threads", "cicada-s3-threads-prefaulted", "cicada-s3-loop", "curl-s3",
    "tensorizer-s3-1", "tensorizer-s3-4", "runai-s3", "runai-local",
    # Not CPU figures: how much a Python thread (standing in for the executor) gets done
    # during the fetch, relative to alone; its own CPU is in cpu_s, so read only spin_ratio.
    "cicada-http-threads-gil", "cicada-http-loop-gil", "cicada-s3-threads-gil", "cicada-s3-loop-gil",
    # urllib3 v2 doing what cicada-http-threads does (16 threads, 8 MiB ranged GETs, bodies
    # into one Arena the size of the file): readinto 8 MiB at a time (-1mib: 1 MiB at a
    # time); -1: one connection, the whole file in one GET; -fp: the private
    # ``resp._fp.readinto`` (http.client, no copy), to show what urllib3's readinto copy costs.
    "urllib3-http", "urllib3-http-1mib", "urllib3-http-1", "urllib3-http-fp",
]
WORKER_TIMEOUT_S = 180
URLLIB3_CONCURRENCY = 16  # backends/http.py's defaults (docs/storage.md)
URLLIB3_CHUNK = 8 << 20


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _s3_settings(cfg: dict[str, Any], data_path: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"endpoint_url": cfg["s3"], "region": "us-east-1", "addressing_style": "path",
            "data_path": data_path, **cfg["creds"], **extra}


class _Spinner:
    """A pure-Python loop in a thread: its rate shows how much of the GIL others leave it."""

    def __init__(self) -> None:
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while not self.stop:
            self.count += 1

    def rate(self, seconds: float) -> float:
        c0, t0 = self.count, time.perf_counter()
        time.sleep(seconds)
        return (self.count - c0) / (time.perf_counter() - t0)


SPIN: dict[str, float] = {}


def _cicada(uri: str, settings: dict[str, Any], prefault: bool, gil: bool = False) -> tuple[float, float, int]:
    from backends import open_backend
    from cicada_async.engine.arena import Arena

    spinner = _Spinner() if gil else None
    if spinner is not None:
        spinner.thread.start()
        SPIN["alone"] = spinner.rate(0.5)

    async def go() -> tuple[float, float, int]:
        backend = open_backend(uri, settings)
        try:
            info = await backend.stat(KEY)  # client creation and first connection: not timed
            arena = Arena(info.size)
            if prefault:  # the byte path alone, as curl's /dev/null: page faults before the clock
                arena.tensor[::4096] = 0
            c0, t0, s0 = _cpu(), time.perf_counter(), spinner.count if spinner else 0
            await backend.read_into(KEY, 0, arena.buffer(0, info.size), version=info.version)
            seconds = time.perf_counter() - t0
            if spinner is not None:
                SPIN["during"] = (spinner.count - s0) / seconds
                spinner.stop = True
            return seconds, _cpu() - c0, info.size
        finally:
            await backend.aclose()

    return asyncio.run(go())


def _urllib3(name: str, url: str, extra: dict[str, Any]) -> tuple[float, float, int]:
    """urllib3 v2 into one Arena, as ``_cicada``'s threaded path: a HEAD outside the clock,
    the first range alone, then ``concurrency`` threads, each a ranged GET (``If-Match`` the
    ETag, as ours sends) whose body lands by ``HTTPResponse.readinto`` in the Arena's slice."""
    from concurrent.futures import ThreadPoolExecutor

    import urllib3

    from cicada_async.engine.arena import Arena

    conc = int(extra.get("concurrency", 1 if name == "urllib3-http-1" else URLLIB3_CONCURRENCY))
    chunk = int(extra.get("chunk_bytes", URLLIB3_CHUNK))
    step = int(extra.get("read_bytes", (1 << 20) if name == "urllib3-http-1mib" else URLLIB3_CHUNK))
    private = name == "urllib3-http-fp"
    pool = urllib3.PoolManager(maxsize=conc, block=True, retries=False,
                               timeout=urllib3.Timeout(connect=10, read=60))
    head = pool.request("HEAD", url)  # client creation and first connection: not timed
    size, etag = int(head.headers["Content-Length"]), head.headers.get("ETag")
    arena = Arena(size)
    view = arena.buffer(0, size)

    def get(start: int, end: int) -> None:
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if etag:
            headers["If-Match"] = etag
        resp = pool.request("GET", url, headers=headers, preload_content=False, decode_content=False)
        try:
            if resp.status != 206 or resp.headers.get("Content-Range", "").split("/")[0] != f"bytes {start}-{end - 1}":
                raise RuntimeError(f"GET {start}-{end - 1}: HTTP {resp.status} {resp.headers.get('Content-Range')}")
            got = start
            while got < end:
                if private:  # http.client's readinto: recv_into our slice, no copy
                    n = cast(Any, resp)._fp.readinto(view[got:end])
                else:
                    n = resp.readinto(view[got:min(end, got + step)])
                if not n:
                    raise RuntimeError(f"body ended {end - got} bytes short")
                got += n
        finally:
            resp.release_conn()

    ranges = [(a, min(a + chunk, size)) for a in range(0, size, chunk)]
    if name == "urllib3-http-1":
        ranges = [(0, size)]
    c0, t0 = _cpu(), time.perf_counter()
    get(*ranges[0])  # alone first, as ours learns that the origin honours Range
    with ThreadPoolExecutor(conc) as ex:
        for _ in ex.map(lambda r: get(*r), ranges[1:]):
            pass
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    pool.clear()
    return seconds, cpu, size


def _presign(cfg: dict[str, Any], key: str) -> str:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=cfg["s3"], region_name="us-east-1",
                          config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
                          **cfg["creds"])
    url: str = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key})
    return url


def worker(name: str, cfg: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One fetch in this (fresh) process: seconds, CPU seconds, bytes."""
    http_uri = f"{cfg['http']}/{cfg['dir']}/"
    path_kind, prefault, gil = name.split("-")[2:3] or [""], name.endswith("-prefaulted"), name.endswith("-gil")
    if name.startswith("cicada-http"):
        seconds, cpu, n = _cicada(http_uri, {"data_path": path_kind[0], **extra}, prefault, gil)
    elif name.startswith("cicada-s3"):
        uri = f"s3://{BUCKET}/{cfg['dir']}"
        seconds, cpu, n = _cicada(uri, _s3_settings(cfg, path_kind[0], extra), prefault, gil)
    elif name.startswith("urllib3-http"):
        seconds, cpu, n = _urllib3(name, f"{http_uri}{KEY}", extra)
    elif name.startswith("curl"):
        url = f"{http_uri}{KEY}" if name == "curl-http" else _presign(cfg, f"{cfg['dir']}/{KEY}")
        c0, t0 = _cpu(), time.perf_counter()
        subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", url], check=True, timeout=WORKER_TIMEOUT_S)
        seconds, cpu, n = time.perf_counter() - t0, _cpu() - c0, cfg["size"]
    elif name.startswith("tensorizer"):
        from tensorizer import TensorDeserializer
        from tensorizer.stream_io import open_stream

        readers = int(name.rsplit("-", 1)[1])
        if "-http-" in name:
            path, kw = f"{http_uri}{TENSORS}", {}
        else:
            path = f"s3://{BUCKET}/{cfg['dir']}/{TENSORS}"
            kw = {"s3_access_key_id": cfg["creds"]["aws_access_key_id"], "force_http": True,
                  "s3_secret_access_key": cfg["creds"]["aws_secret_access_key"], "s3_endpoint": cfg["s3"]}
        c0, t0 = _cpu(), time.perf_counter()
        with open_stream(path, "rb", **kw) as stream:
            tensors = TensorDeserializer(stream, device="cpu", num_readers=readers)
            n = sum(t.numel() * t.element_size() for t in tensors.values())
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    elif name.startswith("runai"):
        os.environ.update({
            "AWS_ENDPOINT_URL": cfg["s3"], "AWS_ACCESS_KEY_ID": cfg["creds"]["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": cfg["creds"]["aws_secret_access_key"], "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            "RUNAI_STREAMER_LOG_LEVEL": "WARNING",
        })
        from runai_model_streamer import SafetensorsStreamer

        path = f"s3://{BUCKET}/{cfg['dir']}/{KEY}" if name == "runai-s3" else str(Path(cfg["root"]) / cfg["dir"] / KEY)
        held = []
        c0, t0 = _cpu(), time.perf_counter()
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(path)
            held = [t for _, t in streamer.get_tensors()]
            seconds, cpu = time.perf_counter() - t0, _cpu() - c0
        n = sum(t.numel() * t.element_size() for t in held)
    else:
        raise SystemExit(f"unknown strategy {name!r}")
    out = {"seconds": seconds, "cpu_s": cpu, "bytes": n, "cpu_s_per_gb": cpu / (n / 1e9),
           "gb_per_s": n / seconds / 1e9}
    if SPIN:
        out["spin_ratio"] = SPIN["during"] / SPIN["alone"]
    return out


def _spawn(name: str, cfg: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "cicada_async.bench.client_cpu", "--worker", name,
            json.dumps(cfg), json.dumps(extra or {})]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if r.returncode != 0:
        return {"error": (r.stderr.strip() or r.stdout.strip())[-600:]}
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def _serialize_tensorizer(src: Path, dst: Path) -> str | None:
    try:
        from safetensors.torch import load_file
        from tensorizer import TensorSerializer
    except ImportError as e:
        return f"tensorizer not installed: {e}"
    ser = TensorSerializer(str(dst))
    ser.write_state_dict(load_file(str(src)))
    ser.close()
    return None


def _median(runs: list[dict[str, Any]], field: str) -> float | None:
    vals = [r[field] for r in runs if field in r]
    return round(statistics.median(vals), 4) if vals else None


def _save(path: Path, results: dict[str, Any]) -> None:
    for entry in results["strategies"].values():
        for field in ("cpu_s_per_gb", "gb_per_s", "spin_ratio"):
            entry[field] = _median(entry["runs"], field)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def _cold_starts(args: argparse.Namespace, cfg: dict[str, Any], root: Path, results: dict[str, Any]) -> None:
    """First answer of a fresh Engine (imports done before the clock) from nginx and s3rver,
    on each data path: what the byte path is for. ``cicada_async.bench.remote``'s worker."""
    from cicada_async.bench.remote import _spawn as spawn_remote

    model = root / "c"
    model.mkdir()
    for f in args.model_dir.iterdir():
        if f.is_file():
            shutil.copyfile(f, model / f.name)
            os.chmod(model / f.name, 0o644)
    os.chmod(model, 0o755)
    upload_s3(cfg["s3"], cfg["creds"], {"c": model})
    rows = results.setdefault("cold_start", {})
    for rep in range(args.repeat):
        for kind in ("http", "s3"):
            for data_path in ("threads", "loop") if rep % 2 == 0 else ("loop", "threads"):
                if kind == "http":
                    uri, storage = f"{cfg['http']}/c/", {"http": {"data_path": data_path}}
                else:
                    uri = f"s3://{BUCKET}/c"
                    storage = {"s3": _s3_settings(cfg, data_path, {})}
                r = spawn_remote(["--worker", "cicada", uri, str(model), json.dumps(storage)])
                r = {"total_s": r["total_s"], "fetch_s": r.get("parts", {}).get("fetch")} if "error" not in r else r
                rows.setdefault(f"{kind}-{data_path}", []).append(r)
                print("cold start", kind, data_path, json.dumps(r)[:200], flush=True)
                _save(args.json, results)
    for name, runs in rows.items():
        totals = [r["total_s"] for r in runs if "total_s" in r]
        results["cold_start_median_s"] = {**results.get("cold_start_median_s", {}),
                                          name: round(statistics.median(totals), 3) if totals else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "command": " ".join(["python -m cicada_async.bench.client_cpu", *sys.argv[1:]]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "note": "CPU = getrusage SELF+CHILDREN of the client process around the fetch (imports, "
                "client creation and the first HEAD outside the clock); origin CPU not counted; "
                "origin files in the page cache; medians over repeats",
        "strategies": {}, "sweep": [],
    }
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="cicada-cpu-"))
        stack.callback(shutil.rmtree, tmp, True)
        root = tmp / "root"
        (root / "m").mkdir(parents=True)
        shutil.copyfile(args.model_dir / KEY, root / "m" / KEY)
        for p in (root, tmp, root / "m"):
            os.chmod(p, 0o755)
        missing = _serialize_tensorizer(root / "m" / KEY, root / "m" / TENSORS)
        for p in (root / "m").iterdir():
            os.chmod(p, 0o644)
        http, http_name = start_http_origin(root, tmp, stack)
        s3, s3_name, creds = start_s3(tmp, stack)
        upload_s3(s3, creds, {"m": root / "m"})
        results["origins"] = {"http": http_name, "s3": s3_name}
        cfg = {"http": http, "s3": s3, "creds": creds, "dir": "m", "root": str(root),
               "size": (root / "m" / KEY).stat().st_size}
        names = [n for n in STRATEGIES if n in args.only] if args.only else STRATEGIES
        for rep in range(args.repeat):
            for name in names if rep % 2 == 0 else names[::-1]:  # alternate to spread drift
                if missing and name.startswith("tensorizer"):
                    run_ = {"error": missing}
                else:
                    run_ = _spawn(name, cfg)
                results["strategies"].setdefault(name, {"runs": []})["runs"].append(run_)
                print(name, json.dumps(run_)[:200], flush=True)
                _save(args.json, results)  # a run cut short keeps what it measured
        if args.cold_start:
            _cold_starts(args, cfg, root, results)
        if args.sweep:
            for kind in ("http", "s3"):
                for conc in (2, 4, 8, 16):
                    for chunk_mib in (4, 8, 32):
                        extra = {"concurrency": conc, "chunk_bytes": chunk_mib << 20}
                        # Prefaulted: page faults cost the same whatever the request pattern,
                        # and they are what makes the fresh-memory figures noisy here.
                        runs = [_spawn(f"cicada-{kind}-threads-prefaulted", cfg, extra)
                                for _ in range(args.sweep_repeat)]
                        row = {"backend": kind, "concurrency": conc, "chunk_mib": chunk_mib,
                               "cpu_s_per_gb": _median(runs, "cpu_s_per_gb"), "gb_per_s": _median(runs, "gb_per_s")}
                        results["sweep"].append(row)
                        print("sweep", json.dumps(row), flush=True)
                        _save(args.json, results)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        print(json.dumps(worker(argv[1], json.loads(argv[2]), json.loads(argv[3]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="strategies, space- or comma-separated")
    p.add_argument("--sweep", action="store_true", help="also concurrency x chunk size of our threads")
    p.add_argument("--sweep-repeat", type=int, default=2)
    p.add_argument("--cold-start", action="store_true", help="also a fresh Engine's first answer, per data path")
    p.add_argument("--json", type=Path, default=Path("bench-results/client-cpu-per-gb.json"))
    args = p.parse_args(argv)
    if args.only:
        args.only = {n for arg in args.only for n in arg.split(",") if n}
        unknown = args.only - set(STRATEGIES)
        if unknown:
            p.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
    _save(args.json, run(args))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
