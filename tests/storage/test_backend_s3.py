"""S3Backend against moto's standalone server: bytes, errors, version pinning, key checks."""

from __future__ import annotations

import array
import asyncio
import os
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from backends import open_backend
from backends.s3 import S3Backend, shared_loader
from protocols.errors import (
    ConfigError,
    IntegrityError,
    ObjectChanged,
    ObjectNotFound,
    StorageError,
)
from protocols.storage import StorageBackend
from tests.fixtures.storage import MiB, S3Model, payload

pytestmark = pytest.mark.timeout(60)

BIG = "model.safetensors"


def settings(model: S3Model, **extra: Any) -> dict[str, Any]:
    return {
        "endpoint_url": model.endpoint,
        "region": "us-east-1",
        "chunk_bytes": 256 * 1024,
        "concurrency": 4,
        "connect_timeout_s": 5,
        "read_timeout_s": 5,
        "backoff_s": 0.01,
        **extra,
    }


@pytest_asyncio.fixture
async def s3(s3_model: S3Model) -> AsyncIterator[S3Backend]:
    backend = open_backend(s3_model.uri, settings(s3_model))
    assert isinstance(backend, S3Backend)
    try:
        yield backend
    finally:
        await backend.aclose()


async def read(backend: StorageBackend, key: str, offset: int, n: int, **kw: Any) -> bytes:
    buf = bytearray(n)
    await asyncio.wait_for(backend.read_into(key, offset, memoryview(buf), **kw), 30)
    return bytes(buf)


async def test_satisfies_protocol(s3: S3Backend) -> None:
    assert isinstance(s3, StorageBackend)
    assert s3.alignment == 1


async def test_stat_gives_size_and_etag(s3: S3Backend, s3_model: S3Model) -> None:
    for key, data in s3_model.files.items():
        info = await s3.stat(key)
        assert (info.key, info.size) == (key, len(data))
        assert info.version and info.version.startswith('"')


@pytest.mark.parametrize("chunk_bytes,concurrency", [(64 * 1024, 1), (256 * 1024, 4), (8 * MiB, 16)])
async def test_whole_object_matches(s3_model: S3Model, chunk_bytes: int, concurrency: int) -> None:
    backend = open_backend(
        s3_model.uri, settings(s3_model, chunk_bytes=chunk_bytes, concurrency=concurrency)
    )
    try:
        for key, data in s3_model.files.items():
            info = await backend.stat(key)
            assert await read(backend, key, 0, info.size, version=info.version) == data
    finally:
        await backend.aclose()


async def test_ranges_match(s3: S3Backend, s3_model: S3Model) -> None:
    data = s3_model.files[BIG]
    rng = random.Random(7)
    cases = [(0, 1), (len(data) - 1, 1), (256 * 1024 - 1, 2), (123, 256 * 1024 * 3 + 5)]
    cases += [(o, rng.randrange(1, len(data) - o + 1)) for o in rng.sample(range(len(data)), 6)]
    for offset, n in cases:
        assert await read(s3, BIG, offset, n) == data[offset : offset + n], (offset, n)


async def test_fills_any_buffer_format(s3: S3Backend, s3_model: S3Model) -> None:
    # The engine hands over views of typed arenas; the backend must land raw bytes in them.
    data = s3_model.files[BIG]
    floats = array.array("f", bytes(4 * 4096))
    await s3.read_into(BIG, 4, memoryview(floats))
    assert floats.tobytes() == data[4 : 4 + 4096 * 4]


async def test_empty_read_sends_nothing(s3_model: S3Model, fault_proxy_factory: Any) -> None:
    proxy = await fault_proxy_factory(s3_model.endpoint)  # counts what reaches the origin
    backend = open_backend(s3_model.uri, settings(s3_model, endpoint_url=proxy.url))
    try:
        await backend.read_into(BIG, 10, memoryview(bytearray()))
        assert proxy.log == []
        await read(backend, BIG, 10, 16)  # the proxy does see a real read: the check can fail
        assert proxy.log
    finally:
        await backend.aclose()


async def test_missing_key_and_bucket(s3: S3Backend, s3_model: S3Model) -> None:
    with pytest.raises(ObjectNotFound):
        await s3.stat("nope.safetensors")
    with pytest.raises(ObjectNotFound):
        await read(s3, "nope.safetensors", 0, 10)
    other = open_backend(f"s3://no-such-bucket-{s3_model.bucket}/x", settings(s3_model))
    try:
        with pytest.raises(ObjectNotFound):
            await read(other, BIG, 0, 10)
    finally:
        await other.aclose()


async def test_read_past_end_is_integrity_error(s3: S3Backend, s3_model: S3Model) -> None:
    size = len(s3_model.files[BIG])
    with pytest.raises(IntegrityError):
        await read(s3, BIG, size - 10, 20)  # range truncated by the server
    with pytest.raises(IntegrityError):
        await read(s3, BIG, size + 10, 20)  # 416


async def test_replaced_between_stat_and_read(s3: S3Backend, s3_model: S3Model) -> None:
    info = await s3.stat(BIG)
    new = payload(info.size, 99)
    await asyncio.to_thread(s3_model.put, BIG, new)
    with pytest.raises(ObjectChanged):
        await read(s3, BIG, 0, info.size, version=info.version)
    # Unpinned, or pinned to the new version, the new bytes come back whole.
    assert await read(s3, BIG, 0, info.size) == new
    fresh = await s3.stat(BIG)
    assert fresh.version != info.version
    assert await read(s3, BIG, 0, info.size, version=fresh.version) == new


BAD_KEYS = [
    "",
    "/etc/passwd",
    "../secret",
    "a/../../b",
    "a/./b",
    "a//b",
    "%2e%2e/secret",
    "%2E%2E%2Fsecret",
    "%252e%252e/secret",
    "a%2fb",
    "dir\\..\\x",
    "x?versionId=1",
    "x#frag",
    "a\x00b",
    "s3:foo",
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_refused(s3: S3Backend, key: str) -> None:
    with pytest.raises(StorageError):
        await s3.stat(key)
    with pytest.raises(StorageError):
        await s3.read_into(key, 0, memoryview(bytearray(4)))


async def test_key_needing_escapes(s3: S3Backend, s3_model: S3Model) -> None:
    key = "sub dir/a+b%c.bin"
    data = s3_model.files[key]
    assert (await s3.stat(key)).size == len(data)
    assert await read(s3, key, 0, len(data)) == data


async def test_concurrency_is_bounded(s3_model: S3Model, fault_proxy_factory: Any) -> None:
    # A bandwidth cap keeps requests open long enough to overlap.
    proxy = await fault_proxy_factory(s3_model.endpoint, bandwidth_bps=40 * MiB)
    backend = open_backend(
        s3_model.uri,
        settings(s3_model, endpoint_url=proxy.url, chunk_bytes=128 * 1024, concurrency=3),
    )
    try:
        data = s3_model.files[BIG]
        assert await read(backend, BIG, 0, len(data)) == data
    finally:
        await backend.aclose()
    gets = [e for e in proxy.log if e.method == "GET"]
    assert len(gets) == -(-len(data) // (128 * 1024))
    assert all(e.headers["Range"].startswith("bytes=") for e in gets)
    assert 1 < proxy.max_in_flight <= 3


async def test_explicit_credentials(s3_model: S3Model) -> None:
    backend = open_backend(
        s3_model.uri,
        settings(s3_model, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret"),
    )
    try:
        assert (await backend.stat("config.json")).size == len(s3_model.files["config.json"])
    finally:
        await backend.aclose()


async def test_backends_read_botocore_data_once(s3_model: S3Model, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each backend has its own session (its own credentials here), but the ~0.2 s of JSON the
    # S3 service model costs is parsed once per process, not per backend and model.
    from botocore.loaders import JSONFileLoader

    shared_loader()
    files: list[str] = []
    load_file = JSONFileLoader.load_file
    monkeypatch.setattr(JSONFileLoader, "load_file", lambda self, path: files.append(path) or load_file(self, path))
    explicit = settings(s3_model, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")
    for extra in (explicit, settings(s3_model)):
        backend = open_backend(s3_model.uri, extra)
        try:
            assert (await backend.stat("config.json")).size == len(s3_model.files["config.json"])
            creds = await backend._client._request_signer._credentials.get_frozen_credentials()  # type: ignore[attr-defined]
            assert creds.access_key == extra.get("aws_access_key_id", "testing")
        finally:
            await backend.aclose()
    assert files == [], files


@pytest.mark.parametrize(
    "uri,extra",
    [
        ("s3://", {}),
        ("s3://bucket/p?x=1", {}),
        ("s3://bucket/p", {"retry_mode": "legacy"}),
        ("s3://bucket/p", {"chunk_size": 1}),  # misspelt
        ("s3://bucket/p", {"concurrency": 0}),
        ("s3://bucket/p", {"read_timeout_s": "soon"}),
        ("s3://bucket/p", {"aws_access_key_id": "only-half"}),
    ],
)
def test_bad_configuration(uri: str, extra: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        open_backend(uri, extra)


async def test_close_is_final_and_idempotent(s3_model: S3Model) -> None:
    backend = open_backend(s3_model.uri, settings(s3_model))
    await backend.stat(BIG)
    await backend.aclose()
    await backend.aclose()
    with pytest.raises(StorageError):
        await backend.stat(BIG)


def _sockets() -> int:
    """Sockets this process holds, from /proc (the client's and, in-process, moto's side)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass  # closed while listed
    return count


@pytest.mark.parametrize("data_path", ["threads", "loop"])
async def test_close_before_use(s3_model: S3Model, data_path: str, fault_proxy_factory: Any) -> None:
    """A backend closed before any call stays closed: every later call raises the documented
    StorageError, and none of them reaches the endpoint or leaves a socket or thread behind."""
    proxy = await fault_proxy_factory(s3_model.endpoint)  # its log: what reached the endpoint
    threads_before = {t.ident for t in threading.enumerate()}
    sockets_before = _sockets()
    backend = open_backend(s3_model.uri, settings(s3_model, data_path=data_path, endpoint_url=proxy.url))
    await backend.aclose()
    with pytest.raises(StorageError, match="closed"):
        await asyncio.wait_for(backend.stat(BIG), 10)
    with pytest.raises(StorageError, match="closed"):
        await asyncio.wait_for(backend.read_into(BIG, 0, memoryview(bytearray(10))), 10)
    assert proxy.log == []
    assert _sockets() <= sockets_before  # (earlier tests' sockets may close meanwhile)
    assert not [t.name for t in threading.enumerate()
                if t.ident not in threads_before and t.name.startswith("cicada-s3")]


@pytest.mark.parametrize("retry_mode", ["standard", "adaptive"])
async def test_retry_modes_ride_out_throttling(
    s3_model: S3Model, fault_proxy_factory: Any, retry_mode: str
) -> None:
    from tests.fixtures.faultproxy import Fault

    proxy = await fault_proxy_factory(s3_model.endpoint)
    proxy.fault = Fault("slowdown", times=2, methods=("HEAD", "GET"))
    backend = open_backend(
        s3_model.uri,
        settings(s3_model, endpoint_url=proxy.url, retry_mode=retry_mode, max_attempts=3),
    )
    try:
        info = await backend.stat(BIG)
        assert await read(backend, BIG, 0, info.size, version=info.version) == s3_model.files[BIG]
    finally:
        await backend.aclose()
    assert proxy.fault.applied == 2
