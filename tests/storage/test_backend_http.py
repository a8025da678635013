"""HTTPBackend against real origins: aiohttp static, nginx, and http.server (ignores Range)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from backends import open_backend
from backends.http import HTTPBackend
from protocols.errors import (
    ConfigError,
    IntegrityError,
    ObjectChanged,
    ObjectNotFound,
    StorageError,
)
from protocols.storage import StorageBackend
from tests.fixtures.faultproxy import Fault
from tests.fixtures.storage import HTTPModel, payload
from tests.storage.test_backend_s3 import BAD_KEYS

pytestmark = pytest.mark.timeout(60)

BIG = "model.safetensors"
CHUNK = 256 * 1024


def settings(**extra: Any) -> dict[str, Any]:
    return {
        "chunk_bytes": CHUNK,
        "concurrency": 4,
        "connect_timeout_s": 5,
        "read_timeout_s": 5,
        "backoff_s": 0.01,
        "resume_attempts": 2,
        **extra,
    }


@pytest_asyncio.fixture
async def http(http_model: HTTPModel) -> AsyncIterator[HTTPBackend]:
    backend = open_backend(http_model.uri, settings())
    assert isinstance(backend, HTTPBackend)
    try:
        yield backend
    finally:
        await backend.aclose()


async def read(backend: StorageBackend, key: str, offset: int, n: int, **kw: Any) -> bytes:
    buf = bytearray(n)
    await asyncio.wait_for(backend.read_into(key, offset, memoryview(buf), **kw), 30)
    return bytes(buf)


async def test_stat(http: HTTPBackend, http_model: HTTPModel) -> None:
    assert isinstance(http, StorageBackend)
    for key, data in http_model.files.items():
        info = await http.stat(key)
        assert (info.key, info.size) == (key, len(data))
        assert info.version


async def test_whole_objects_match(http: HTTPBackend, http_model: HTTPModel) -> None:
    for key, data in http_model.files.items():
        info = await http.stat(key)
        assert await read(http, key, 0, info.size, version=info.version) == data
    assert http.ranges_supported is (http_model.origin != "stdlib")


async def test_ranges_match(http: HTTPBackend, http_model: HTTPModel) -> None:
    data = http_model.files[BIG]
    rng = random.Random(11)
    cases = [(0, 1), (len(data) - 1, 1), (CHUNK - 1, 2), (99, CHUNK * 3 + 5)]
    cases += [(o, rng.randrange(1, len(data) - o + 1)) for o in rng.sample(range(len(data)), 5)]
    for offset, n in cases:
        assert await read(http, BIG, offset, n) == data[offset : offset + n], (offset, n)


async def test_missing_key(http: HTTPBackend) -> None:
    with pytest.raises(ObjectNotFound):
        await http.stat("nope.bin")
    with pytest.raises(ObjectNotFound):
        await read(http, "nope.bin", 0, 10)


async def test_read_past_end(http: HTTPBackend, http_model: HTTPModel) -> None:
    size = len(http_model.files[BIG])
    with pytest.raises(IntegrityError):
        await read(http, BIG, size - 10, 20)
    with pytest.raises(IntegrityError):
        await read(http, BIG, size + 10, 20)


async def test_replaced_between_stat_and_read(http: HTTPBackend, http_model: HTTPModel) -> None:
    info = await http.stat(BIG)
    new = payload(info.size, 1234)
    await asyncio.to_thread(http_model.put, BIG, new)
    with pytest.raises(ObjectChanged):
        await read(http, BIG, 0, info.size, version=info.version)
    fresh = await http.stat(BIG)
    assert fresh.version != info.version
    assert await read(http, BIG, 0, info.size, version=fresh.version) == new


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_refused(http: HTTPBackend, key: str) -> None:
    with pytest.raises(StorageError):
        await http.stat(key)
    with pytest.raises(StorageError):
        await http.read_into(key, 0, memoryview(bytearray(4)))


async def test_key_needing_escapes(http: HTTPBackend, http_model: HTTPModel) -> None:
    key = "sub dir/a+b%c.bin"
    assert str(http.url(key)).endswith("/sub%20dir/a%2Bb%25c.bin")
    data = http_model.files[key]
    assert (await http.stat(key)).size == len(data)
    assert await read(http, key, 0, len(data)) == data


@pytest.mark.parametrize("http_model", ["stdlib"], indirect=True)
async def test_origin_ignoring_ranges_streams_once(
    http_model: HTTPModel, fault_proxy_factory: Any
) -> None:
    proxy = await fault_proxy_factory(http_model.base)
    backend = open_backend(f"{proxy.url}/{http_model.dir.name}/", settings())
    data = http_model.files[BIG]
    try:
        await read(backend, BIG, 10, 100)  # learns that ranges are ignored
        proxy.log.clear()
        assert await read(backend, BIG, 5, len(data) - 5) == data[5:]
    finally:
        await backend.aclose()
    # One request for a read that is 8 chunks long: no chunk re-streams the object.
    assert [e.method for e in proxy.log] == ["GET"]


async def test_head_refused_falls_back_to_ranged_get(
    http_model: HTTPModel, fault_proxy_factory: Any
) -> None:
    proxy = await fault_proxy_factory(http_model.base)
    backend = open_backend(f"{proxy.url}/{http_model.dir.name}/", settings())
    try:
        direct = await backend.stat(BIG)
        for status in (405, 403):
            proxy.fault = Fault("status", status=status, methods=("HEAD",), times=-1)
            info = await backend.stat(BIG)
            assert info == direct
            assert (await backend.stat("config.json")).size == len(http_model.files["config.json"])
    finally:
        await backend.aclose()


async def test_redirects(http_model: HTTPModel, fault_proxy_factory: Any) -> None:
    proxy = await fault_proxy_factory(http_model.base)
    backend = open_backend(f"{proxy.url}/{http_model.dir.name}/", settings(max_redirects=3))
    data = http_model.files[BIG]
    try:
        proxy.fault = Fault("redirect", times=2, methods=("GET", "HEAD"))
        assert (await backend.stat(BIG)).size == len(data)
        assert await read(backend, BIG, 0, 1000) == data[:1000]
        proxy.fault = Fault("redirect", times=-1, methods=("GET", "HEAD"))
        with pytest.raises(StorageError, match="redirect"):
            await read(backend, BIG, 0, 1000)
    finally:
        await backend.aclose()


async def test_configured_headers_are_sent(http_model: HTTPModel, fault_proxy_factory: Any) -> None:
    proxy = await fault_proxy_factory(http_model.base)
    backend = open_backend(
        f"{proxy.url}/{http_model.dir.name}/",
        settings(headers={"Authorization": "Bearer t0ken", "X-Tenant": "a"}),
    )
    try:
        info = await backend.stat(BIG)
        await read(backend, BIG, 0, 3 * CHUNK, version=info.version)
    finally:
        await backend.aclose()
    assert proxy.log
    for entry in proxy.log:
        assert entry.headers["Authorization"] == "Bearer t0ken"
        assert entry.headers["X-Tenant"] == "a"
        assert entry.headers["Accept-Encoding"] == "identity"
    gets = [e for e in proxy.log if e.method == "GET"]
    if http_model.origin != "stdlib":
        assert {e.headers["Range"] for e in gets} == {
            f"bytes={i * CHUNK}-{(i + 1) * CHUNK - 1}" for i in range(3)
        }
    if info.version and info.version.startswith('"'):
        assert all(e.headers["If-Match"] == info.version for e in gets)


@pytest.mark.parametrize(
    "uri,extra",
    [
        ("ftp://host/x/", {}),
        ("http:///x/", {}),
        ("http://host/x/?q=1", {}),
        ("http://host/x/", {"headers": {"A": 1}}),
        ("http://host/x/", {"chunk_size": 1}),
        ("http://host/x/", {"max_attempts": 0}),
    ],
)
def test_bad_configuration(uri: str, extra: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        HTTPBackend.from_uri(uri, extra)


def test_root_gets_a_trailing_slash() -> None:
    backend = HTTPBackend.from_uri("https://example.invalid/models/tiny", {})
    assert str(backend.url("config.json")) == "https://example.invalid/models/tiny/config.json"


async def test_close_is_final(http_model: HTTPModel) -> None:
    backend = open_backend(http_model.uri, settings())
    await backend.stat(BIG)
    await backend.aclose()
    await backend.aclose()
    with pytest.raises(StorageError):
        await backend.stat(BIG)
