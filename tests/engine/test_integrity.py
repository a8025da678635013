"""With a manifest, no request is answered from unverified bytes, on every landing path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backends.memory import Faults, MemoryBackend
from cicada_async.engine.executor import Executor
from cicada_async.engine.fetch import FetchScheduler
from cicada_async.engine.job import LoadOptions
from cicada_async.engine.pack import pack
from cicada_async.engine.pipeline import LoadRequest, cold_start
from cicada_async.engine.runtime import Engine, ModelOptions
from protocols.errors import IntegrityError
from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def packed(model_dirs: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "packed"
    pack(model_dirs["tiny-gpt2"], dst)
    return dst


def _corrupt(d: Path) -> None:
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x01  # tensor data: the header parses, the digest does not match
    f.write_bytes(bytes(raw))


async def _cold(d: Path, options: LoadOptions, faults: Faults | None = None):  # type: ignore[no-untyped-def]
    backend = MemoryBackend.from_dir(d, faults)
    ex = Executor()
    ex.start()
    try:
        return await cold_start(backend, ex, FetchScheduler(2), LoadRequest(inputs=inputs_for(d), options=options))
    finally:
        await backend.aclose()
        ex.stop()


@pytest.mark.parametrize("staging", [False, True])
async def test_converting_load_of_a_packed_model_verifies(packed: Path, staging: bool) -> None:
    """Anonymous arenas with dtype conversion (converted spans are released as they apply) and
    the staging path both verify correctly: no false IntegrityError, exact outputs."""
    import torch

    inputs = inputs_for(packed)
    _, out, _ = await _cold(packed, LoadOptions(dtype=torch.bfloat16, read_bytes=8192, staging=staging))
    assert_equal_outputs(reference(packed, inputs, dtype=torch.bfloat16), out)


@pytest.mark.parametrize("staging", [False, True])
async def test_corrupt_bytes_fail_on_every_landing_path(packed: Path, staging: bool) -> None:
    _corrupt(packed)
    with pytest.raises(IntegrityError, match="SHA-256"):
        await _cold(packed, LoadOptions(read_bytes=8192, staging=staging))


async def test_a_request_that_joined_the_load_is_not_answered_from_corrupt_bytes(packed: Path) -> None:
    _corrupt(packed)
    inputs = inputs_for(packed)
    # Slow reads keep the load in flight while the second request joins it.
    async with Engine(storage={"memory": {"delay_s": 0.02}}, read_bytes=8192) as engine:
        inst = engine.instance("m", f"memory://{packed}", ModelOptions())
        first = asyncio.create_task(inst.infer(inputs))
        while inst._job is None or not inst._job.done():  # the gates are in: others may join
            await asyncio.sleep(0.001)
        assert inst.state == "loading" and not first.done()
        second = asyncio.create_task(inst.infer(inputs))
        results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, IntegrityError) for r in results), results


async def test_verification_does_not_queue_on_the_default_pool(packed: Path) -> None:
    """Whole-file hashes run on a bounded pool of their own (review-3 C-8): with the loop's
    default pool taken by other blocking work (disk reads, body codecs), a packed load still
    verifies and answers."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    busy = ThreadPoolExecutor(1)
    loop.set_default_executor(busy)
    release = threading.Event()
    blocker = loop.run_in_executor(None, release.wait, 60)
    try:
        inputs = inputs_for(packed)
        _, out, _ = await asyncio.wait_for(_cold(packed, LoadOptions(read_bytes=8192)), 20)
        assert_equal_outputs(reference(packed, inputs), out)
    finally:
        release.set()
        await blocker
