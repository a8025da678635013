"""Real storage servers for backend tests: moto (S3), aiohttp static, nginx, python http.server.

Register with ``pytest_plugins = ["tests.fixtures_storage"]`` (or ``-p tests.fixtures_storage``).
Servers are session-scoped and listen on 127.0.0.1; each test gets its own bucket or its own
directory under the served root, so tests can replace objects without disturbing others.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from tests.faultproxy import FaultProxy

MiB = 1 << 20


def payload(size: int, seed: int) -> bytes:
    """Deterministic incompressible bytes: a wrong offset never compares equal by accident."""
    return random.Random(seed).randbytes(size)


# Keys every test model has: an uneven size so the last chunk is ragged, a tiny file, and a
# key that needs escaping in a URL.
MODEL_FILES: dict[str, bytes] = {
    "model.safetensors": payload(2 * MiB + 777, 1),
    "config.json": b'{"model_type": "tiny"}\n',
    "sub dir/a+b%c.bin": payload(70_001, 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def write_replacing(path: Path, data: bytes) -> None:
    """Replace a served file by rename and move its mtime, so every origin's validator
    (nginx's ETag and http.server's Last-Modified have one-second resolution) changes."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    old = path.stat().st_mtime if path.exists() else time.time()
    os.utime(tmp, (old + 10, old + 10))
    os.replace(tmp, path)


# ---------------------------------------------------------------- environment


@pytest.fixture(scope="session")
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fake credentials and no ~/.aws: nothing a test does can reach a real account."""
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                mp.delenv(name)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(home / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


# ---------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="session")
def moto_endpoint(aws_env: None) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class S3Model:
    endpoint: str
    bucket: str
    prefix: str
    files: dict[str, bytes]
    client: Any  # a synchronous botocore client straight to moto, for setup and replacement

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)
        self.files[key] = data


@pytest.fixture
def s3_model(moto_endpoint: str) -> Iterator[S3Model]:
    """A fresh bucket holding MODEL_FILES under ``models/tiny``."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"cicada-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    model = S3Model(moto_endpoint, bucket, "models/tiny", {}, client)
    for key, data in MODEL_FILES.items():
        model.put(key, data)
    try:
        yield model
    finally:
        listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        for obj in listed:
            client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)
        client.close()


# ---------------------------------------------------------------- HTTP origins


class ThreadedStaticServer:
    """aiohttp's static route (Range and If-Match supported) on its own loop and thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_static("/", self.root, show_index=False, follow_symlinks=False)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=15)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        self._loop.close()


@pytest.fixture(scope="session")
def served_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory every HTTP origin serves; tests add their own subdirectories."""
    return tmp_path_factory.mktemp("origin")


@pytest.fixture(scope="session")
def aiohttp_origin(served_root: Path) -> Iterator[str]:
    server = ThreadedStaticServer(served_root)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nginx_origin(served_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from cicada_async.bench_remote import find_nginx, spawn_nginx

    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx-light)")
    port = free_port()
    proc = spawn_nginx(nginx, served_root, tmp_path_factory.mktemp("nginx"), port)
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def stdlib_origin(served_root: Path) -> Iterator[str]:
    """``python -m http.server``: answers every ranged GET with 200 and the whole file."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(served_root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@dataclass
class HTTPModel:
    origin: str  # "aiohttp", "nginx" or "stdlib"
    base: str  # http://127.0.0.1:PORT
    dir: Path
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"{self.base}/{self.dir.name}/"

    def put(self, key: str, data: bytes) -> None:
        path = self.dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        write_replacing(path, data)
        self.files[key] = data


ORIGINS = ["aiohttp", "nginx", "stdlib"]


@pytest.fixture(params=ORIGINS)
def http_model(request: pytest.FixtureRequest, served_root: Path) -> Iterator[HTTPModel]:
    """MODEL_FILES in a fresh directory, served by each origin in turn."""
    base = request.getfixturevalue(f"{request.param}_origin")
    directory = served_root / uuid.uuid4().hex[:12]
    model = HTTPModel(request.param, base, directory)
    for key, data in MODEL_FILES.items():
        model.put(key, data)
    try:
        yield model
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- fault proxy


@pytest_asyncio.fixture
async def fault_proxy_factory() -> AsyncIterator[Any]:
    """``await make(upstream, bandwidth_bps=None) -> FaultProxy``, closed after the test."""
    proxies: list[FaultProxy] = []

    async def make(upstream: str, *, bandwidth_bps: float | None = None) -> FaultProxy:
        proxy = FaultProxy(upstream, bandwidth_bps=bandwidth_bps)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()
