"""The fault matrix: every fault the proxy can inject, against S3 (moto) and HTTP origins.

Each read either lands exactly the object's bytes or raises the expected error class within
its deadline; it never hangs and never returns wrong bytes. docs/storage.md reproduces the
matrix from EXPECTED below.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from backends import open_backend
from protocols.errors import (
    IntegrityError,
    ObjectChanged,
    ObjectNotFound,
    StorageError,
    StorageTimeout,
)
from tests.fixtures.faultproxy import Fault, FaultProxy
from tests.fixtures.storage import MiB, HTTPModel, S3Model, payload

pytestmark = pytest.mark.timeout(60)

KEY = "model.safetensors"
READ_TIMEOUT_S = 0.5
# A deadline far above what any case needs (a few seconds at most) and far below a hang.
DEADLINE_S = 20.0

SETTINGS: dict[str, Any] = {
    "chunk_bytes": 512 * 1024,
    "concurrency": 4,
    "connect_timeout_s": 2,
    "read_timeout_s": READ_TIMEOUT_S,
    "max_attempts": 3,
    "resume_attempts": 2,
    "backoff_s": 0.01,
    "backoff_max_s": 0.05,
}

OK = None  # the read completes with the right bytes
Outcome = type[BaseException] | None

# fault name -> (how to make it, outcome on S3, outcome on HTTP)
FAULTS: dict[str, tuple[Callable[[], Fault], Outcome, Outcome]] = {
    "drop mid-body once": (lambda: Fault("drop"), OK, OK),
    "drop mid-body always": (lambda: Fault("drop", times=-1), StorageError, StorageError),
    "500 then success": (lambda: Fault("status", status=500), OK, OK),
    "503 x2 then success": (lambda: Fault("status", status=503, times=2), OK, OK),
    "503 always": (lambda: Fault("status", status=503, times=-1), StorageError, StorageError),
    "S3 SlowDown then success": (lambda: Fault("slowdown", times=2), OK, OK),
    "404": (lambda: Fault("status", status=404, times=-1), ObjectNotFound, ObjectNotFound),
    "403": (lambda: Fault("status", status=403, times=-1), StorageError, StorageError),
    "412 on GET": (lambda: Fault("status", status=412, times=-1), ObjectChanged, ObjectChanged),
    "body one byte short once": (lambda: Fault("short"), OK, OK),
    "body one byte short always": (lambda: Fault("short", times=-1), IntegrityError, IntegrityError),
    "200 ignoring Range": (lambda: Fault("ignore_range", times=-1), IntegrityError, OK),
    "wrong Content-Range": (lambda: Fault("wrong_range"), IntegrityError, IntegrityError),
    "stall after headers once": (lambda: Fault("stall", stall_s=5), OK, OK),
    "stall after headers always": (
        lambda: Fault("stall", stall_s=30, times=-1),
        StorageTimeout,
        StorageTimeout,
    ),
    "stall before headers once": (
        lambda: Fault("stall", stall_s=5, stall_before_headers=True),
        OK,
        OK,
    ),
    "stall before headers always": (
        lambda: Fault("stall", stall_s=30, stall_before_headers=True, times=-1),
        StorageTimeout,
        StorageTimeout,
    ),
    "object replaced mid-load": (lambda: Fault("replace", after=2), ObjectChanged, ObjectChanged),
}


async def run_case(
    proxy: FaultProxy,
    uri: str,
    extra: dict[str, Any],
    fault: Fault,
    expected: Outcome,
    original: bytes,
) -> None:
    backend = open_backend(uri, {**SETTINGS, **extra})
    try:
        info = await backend.stat(KEY)  # before the fault: stat is not what is tested here
        assert info.size == len(original)
        proxy.fault = fault
        buf = bytearray(info.size)
        started = time.monotonic()
        read = backend.read_into(KEY, 0, memoryview(buf), version=info.version)
        if expected is OK:
            await asyncio.wait_for(read, DEADLINE_S)
            assert bytes(buf) == original
        else:
            with pytest.raises(expected) as caught:
                await asyncio.wait_for(read, DEADLINE_S)
            # The class must be the one expected, not merely a subclass of StorageError
            # standing in for it (ObjectChanged is a StorageError too).
            assert type(caught.value) is expected, repr(caught.value)
        elapsed = time.monotonic() - started
        assert elapsed < DEADLINE_S / 2, f"took {elapsed:.1f}s"
        assert fault.applied >= 1, "the fault never fired: the case tested nothing"
    finally:
        await backend.aclose()


@pytest.mark.parametrize("name", list(FAULTS))
async def test_s3_fault(name: str, s3_model: S3Model, fault_proxy_factory: Any) -> None:
    make, expected, _ = FAULTS[name]
    proxy = await fault_proxy_factory(s3_model.endpoint)
    fault = make()
    if fault.mode == "replace":

        async def replace() -> None:
            await asyncio.to_thread(s3_model.put, KEY, payload(len(s3_model.files[KEY]), 5))

        fault.on_request = replace
    original = s3_model.files[KEY]
    extra = {"endpoint_url": proxy.url, "region": "us-east-1", "op_timeout_s": 10}
    await run_case(proxy, s3_model.uri, extra, fault, expected, original)


@pytest.mark.parametrize("http_model", ["aiohttp", "nginx"], indirect=True)
@pytest.mark.parametrize("name", list(FAULTS))
async def test_http_fault(name: str, http_model: HTTPModel, fault_proxy_factory: Any) -> None:
    make, _, expected = FAULTS[name]
    proxy = await fault_proxy_factory(http_model.base)
    fault = make()
    if fault.mode == "replace":

        async def replace() -> None:
            new = payload(len(http_model.files[KEY]), 5)
            await asyncio.to_thread(http_model.put, KEY, new)

        fault.on_request = replace
    original = http_model.files[KEY]
    uri = f"{proxy.url}/{http_model.dir.name}/"
    await run_case(proxy, uri, {}, fault, expected, original)


@pytest.mark.parametrize("http_model", ["stdlib"], indirect=True)
@pytest.mark.parametrize(
    "name", ["drop mid-body once", "body one byte short once", "object replaced mid-load"]
)
async def test_range_ignoring_origin_fault(
    name: str, http_model: HTTPModel, fault_proxy_factory: Any
) -> None:
    """The whole-object path (200 to a ranged GET) resumes and pins versions too."""
    make, _, expected = FAULTS[name]
    proxy = await fault_proxy_factory(http_model.base)
    fault = make()
    if fault.mode == "replace":
        fault.after = 0

        async def replace() -> None:
            new = payload(len(http_model.files[KEY]), 5)
            await asyncio.to_thread(http_model.put, KEY, new)

        fault.on_request = replace
    else:
        # The first GET (the probe) reads only the first chunk; the second streams to the
        # end of the object, which is where a drop at mid-object and a short end fall.
        fault.after = 1
    uri = f"{proxy.url}/{http_model.dir.name}/"
    await run_case(proxy, uri, {}, fault, expected, http_model.files[KEY])
    gets = [e for e in proxy.log if e.method == "GET"]
    # probe + whole-object stream (+ one resume of it), or the probe alone when it failed
    assert len(gets) == (1 if fault.mode == "replace" else 3), [e.headers.get("Range") for e in gets]


@pytest.mark.parametrize("kind", ["s3", "http"])
async def test_bandwidth_cap(
    kind: str, s3_model: S3Model, fault_proxy_factory: Any, aiohttp_origin: str, served_root: Any
) -> None:
    """The proxy's cap holds across concurrent requests (what benchmarks rely on)."""
    rate = 8 * MiB
    if kind == "s3":
        proxy = await fault_proxy_factory(s3_model.endpoint, bandwidth_bps=rate)
        uri, extra, data = s3_model.uri, {"endpoint_url": proxy.url}, s3_model.files[KEY]
    else:
        model = HTTPModel("aiohttp", aiohttp_origin, served_root / f"bw-{s3_model.bucket}")
        model.put(KEY, s3_model.files[KEY])
        proxy = await fault_proxy_factory(aiohttp_origin, bandwidth_bps=rate)
        uri, extra, data = f"{proxy.url}/{model.dir.name}/", {}, model.files[KEY]
    backend = open_backend(uri, {**SETTINGS, **extra, "read_timeout_s": 5})
    try:
        buf = bytearray(len(data))
        started = time.monotonic()
        await asyncio.wait_for(backend.read_into(KEY, 0, memoryview(buf)), DEADLINE_S)
        elapsed = time.monotonic() - started
    finally:
        await backend.aclose()
    assert bytes(buf) == data
    assert elapsed >= 0.8 * len(data) / rate


@pytest.mark.parametrize("kind", ["s3", "http"])
async def test_cancelled_read_leaves_nothing_behind(
    kind: str, s3_model: S3Model, fault_proxy_factory: Any, aiohttp_origin: str, served_root: Any
) -> None:
    """Cancelling a stalled read returns promptly, and the backend stays usable."""
    if kind == "s3":
        proxy = await fault_proxy_factory(s3_model.endpoint)
        uri, extra, data = s3_model.uri, {"endpoint_url": proxy.url}, s3_model.files[KEY]
    else:
        model = HTTPModel("aiohttp", aiohttp_origin, served_root / f"cancel-{s3_model.bucket}")
        model.put(KEY, s3_model.files[KEY])
        proxy = await fault_proxy_factory(aiohttp_origin)
        uri, extra, data = f"{proxy.url}/{model.dir.name}/", {}, model.files[KEY]
    backend = open_backend(uri, {**SETTINGS, **extra, "read_timeout_s": 30})
    try:
        await backend.stat(KEY)
        baseline = len(asyncio.all_tasks())
        proxy.fault = Fault("stall", stall_s=60, times=-1)
        buf = bytearray(len(data))
        task = asyncio.create_task(backend.read_into(KEY, 0, memoryview(buf)))
        await asyncio.sleep(0.5)
        assert not task.done()
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0
        # The proxy's stalled handlers end once their clients hang up.
        for _ in range(100):
            if proxy.in_flight == 0 and len(asyncio.all_tasks()) <= baseline:
                break
            await asyncio.sleep(0.02)
        assert proxy.in_flight == 0
        assert len(asyncio.all_tasks()) <= baseline
        proxy.fault = None
        buf = bytearray(len(data))
        await asyncio.wait_for(backend.read_into(KEY, 0, memoryview(buf)), DEADLINE_S)
        assert bytes(buf) == data
    finally:
        await backend.aclose()
