"""A staging copy that runs after its landing closed (a failed load's copies were posted to the
executor and run later) leaves nothing behind: no device buffer held outside the landing's
accounting, no poller started (review-3 G-9). On CPU the landing takes the same path as CUDA's
converting loads up to the stream; the copies are posted to a list the test runs."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cicada_async.engine.staging import StagingLanding
from protocols.manifest import FileHeader, ReadRange

pytestmark = pytest.mark.timeout(30)

READ = 64
FILE = "m.safetensors"


@pytest.mark.parametrize("converting", [True, False])
async def test_a_copy_run_after_aclose_holds_no_buffer(converting: bool) -> None:
    posted: list[object] = []
    header = FileHeader(FILE, 2 * READ, None, 0, {})
    landing = StagingLanding({FILE: header}, torch.device("cpu"), slab_bytes=READ, pool_bytes=2 * READ,
                             post=posted.append, loop=asyncio.get_running_loop(), converting=converting)
    reads = [ReadRange(FILE, k * READ, (k + 1) * READ, ()) for k in range(2)]
    for r, read in enumerate(reads):
        buf = await landing.buffer_for(r, read)
        buf[:] = bytes([r + 1]) * READ
        landing.read_landed(r, read)
    posted.pop(0)()  # type: ignore[operator]  # one copy runs while the load is alive
    assert len(landing.device_reads) == (1 if converting else 0)
    await landing.aclose()  # the load failed; the other copy is still posted
    assert landing.device_reads == {}
    posted.pop(0)()  # type: ignore[operator]  # ...and runs now
    await asyncio.sleep(0)  # the loop-side callbacks of the copy
    # Converting: no buffer was allocated and kept for a read nobody will make tensors from.
    assert landing.device_reads == {}, "a copy after aclose kept a device buffer"
    assert landing._poller is None  # no stream on CPU, and none started after the close
    if not converting:
        # File-shaped buffers: tensors may view them, so the bytes are still copied in.
        assert bytes(landing.device_files[FILE][READ:].numpy()) == bytes([2]) * READ
    await landing.settled()  # every posted copy counted as run: nothing waits forever
