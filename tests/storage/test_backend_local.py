"""Local-disk reads do not queue behind the loop's default executor (review-3 C-8): that pool
also carries body codecs, whole-file hashes and CUDA event waits, and a weight read stuck
behind them stalls the layer that waits for it."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backends.local import LocalBackend, _populate_supported

pytestmark = pytest.mark.timeout(60)

SIZE = 3 * 4096 + 123  # an aligned body (O_DIRECT where the file system allows) and a tail
DEFAULT_THREADS = 2


@pytest.fixture
async def saturated() -> AsyncIterator[None]:
    """The running loop's default executor, every thread blocked until the test ends (as by
    multi-second hashes or large body decodes)."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(DEFAULT_THREADS))
    release = threading.Event()
    running = threading.Semaphore(0)

    def blocked() -> None:
        running.release()
        release.wait(30)

    jobs = [loop.run_in_executor(None, blocked) for _ in range(DEFAULT_THREADS * 3)]
    for _ in range(DEFAULT_THREADS):  # every default thread is inside a job
        async with asyncio.timeout(5):
            while not running.acquire(blocking=False):
                await asyncio.sleep(0.01)
    try:
        yield
    finally:
        release.set()
        await asyncio.gather(*jobs)


@pytest.fixture
def weights(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    (tmp_path / "w.bin").write_bytes(data)
    return tmp_path, data


@pytest.mark.parametrize("direct_io", [True, False])
async def test_read_and_stat_finish_while_the_default_executor_is_full(
    saturated: None, weights: tuple[Path, bytes], direct_io: bool
) -> None:
    root, data = weights
    backend = LocalBackend(root, direct_io=direct_io)
    # Page-aligned, so the O_DIRECT path is taken where it can be.
    arena = memoryview(bytearray(SIZE + 4096))
    skew = (-ctypes.addressof(ctypes.c_char.from_buffer(arena))) % 4096
    buf = arena[skew : skew + SIZE]
    try:
        info = await asyncio.wait_for(backend.stat("w.bin"), 10)
        await asyncio.wait_for(backend.read_into("w.bin", 0, buf, version=info.version), 10)
        assert info.size == SIZE and bytes(buf) == data  # the file as written, byte for byte
        tail = memoryview(bytearray(500))
        await asyncio.wait_for(backend.read_into("w.bin", 4096 + 7, tail), 10)
        assert bytes(tail) == data[4096 + 7 : 4096 + 507]
    finally:
        await backend.aclose()


async def test_populate_finishes_while_the_default_executor_is_full(
    saturated: None, weights: tuple[Path, bytes]
) -> None:
    root, data = weights
    if not _populate_supported():
        pytest.skip("MADV_POPULATE_READ needs Linux 5.14+")
    backend = LocalBackend(root)
    mapping = backend.map_file("w.bin", SIZE)
    try:
        await asyncio.wait_for(backend.populate("w.bin", mapping, 0, SIZE), 10)
        assert mapping[:] == data
    finally:
        mapping.close()
        await backend.aclose()


async def test_disk_threads_are_bounded_and_end_at_close(weights: tuple[Path, bytes]) -> None:
    root, data = weights
    backend = LocalBackend(root, direct_io=False, io_threads=2)
    bufs = [memoryview(bytearray(100)) for _ in range(16)]
    await asyncio.gather(*(backend.read_into("w.bin", 100 * i, b) for i, b in enumerate(bufs)))
    assert all(bytes(b) == data[100 * i : 100 * i + 100] for i, b in enumerate(bufs))
    disk = [t for t in threading.enumerate() if t.name.startswith("cicada-disk")]
    assert 1 <= len(disk) <= 2
    await backend.aclose()
    for t in disk:
        t.join(5)
    assert not any(t.is_alive() for t in disk)
