"""A kept read slot never waits for the admission lock (the staging CI hang).

A worker keeps its read slot from one read to the next while no other read waits for a slot
(``FetchScheduler.contested``). Before the next read it must not wait for anything, least of
all the admission lock, whose holder may wait for budget that only a read in flight frees.
The worker gave its slot back when the lock was *held*, but ``asyncio.Lock`` is fair: just
after a release, with the next waiter woken but not yet running, ``locked()`` is False and a
newcomer still queues behind that waiter. Two workers landing in that window each queued for
the lock with a slot in hand; the lock's new holder waited for budget; the read in flight
(waiting for a staging slab, so no slot waiter was visible when the two kept theirs) then
waited for a slot forever: no timers, an idle loop, the gated forward stuck at a gate.

Here the interleaving is forced through the real Fetcher, ShardLedger and StagingLanding (CPU):
the backend's reads wait on futures the test resolves, and the staging copies are posted to a
list the test runs, so nothing depends on thread timing.
"""

from __future__ import annotations

import asyncio

import pytest

from cicada_async.engine.executor import Executor
from cicada_async.engine.fetch import Fetcher, FetchScheduler, FetchSettings, LoadPriority
from cicada_async.engine.ledger import ShardLedger
from cicada_async.engine.staging import StagingLanding
from cicada_async.engine.timeline import Timeline
from protocols.manifest import FileHeader, Plan, ReadRange, Shard

pytestmark = pytest.mark.timeout(60)

READ = 100  # bytes per read; the budget admits three reads in flight, not four
FILE = "m.safetensors"


class HeldBackend:
    """Reads of the offsets in ``held`` wait until the test resolves them; others land at once."""

    def __init__(self, held: list[int]) -> None:
        loop = asyncio.get_running_loop()
        self.held = {off: loop.create_future() for off in held}
        self.asked: list[int] = []

    async def read_into(self, key: str, offset: int, buf: memoryview, *, version: str | None = None) -> None:
        self.asked.append(offset)
        if offset in self.held:
            await self.held[offset]
        buf[:] = bytes([offset // READ % 256]) * len(buf)


async def _settle() -> None:
    """Run every ready callback until the loop has nothing left (no threads are involved)."""
    for _ in range(50):
        await asyncio.sleep(0)


def _reads(n: int, shards: tuple[int, ...]) -> tuple[ReadRange, ...]:
    return tuple(ReadRange(FILE, k * READ, (k + 1) * READ, shards) for k in range(n))


async def test_a_slot_kept_across_the_admission_lock_window_does_not_starve_a_read() -> None:
    loop = asyncio.get_running_loop()
    posted: list[object] = []
    header = FileHeader(FILE, 5 * READ, None, 0, {})
    # Two slabs, as the CI run had: a third read in flight waits for a copy to free one.
    landing = StagingLanding({FILE: header}, __import__("torch").device("cpu"), slab_bytes=READ,
                             pool_bytes=2 * READ, post=posted.append, loop=loop)
    ex = Executor()
    ex.start()
    ledger = ShardLedger(ex, loop)
    backend = HeldBackend([0, READ])
    sched = FetchScheduler(2)
    # Before the plan: two reads serving no shard (as the file-order reads before a skeleton).
    fetcher = Fetcher(Plan((), (), _reads(2, ()), "file", ()), backend, {FILE: header}, landing,  # type: ignore[arg-type]
                      settings=FetchSettings(concurrency=4, queue_bytes=3 * READ + READ // 2),
                      scheduler=sched, priority=LoadPriority(), ledger=ledger, timeline=Timeline())
    task = asyncio.create_task(fetcher.run())
    try:
        await _settle()
        # Two workers hold both slots and slabs, reading; a third holds the admission lock
        # waiting for the plan; the fourth waits for that lock.
        assert backend.asked == [0, READ] and landing._free.empty()

        # The plan: five reads, all for one shard (lm_head's), so their budget stays held
        # until the last lands. The replan wakes the lock holder first, then both reads land
        # in the same loop turn, right after it.
        ledger.plan(1, lambda i: ledger.applied(i))
        await fetcher.replan(Plan(("m",), (Shard(0, "m", ("t",), tuple(range(5)), 5 * READ),),
                                  _reads(5, (0,)), "registration", ()), final=True)
        backend.held[0].set_result(None)
        backend.held[READ].set_result(None)
        await _settle()
        # The lock holder admitted read 2 and waits for a slab; the landed reads' copies are
        # posted, not yet run. Running them frees the slabs.
        while posted:
            posted.pop(0)()  # type: ignore[operator]
        await _settle()
        # Read 2 must reach storage: it needs a slot, and no slot may be held by a worker
        # waiting for the admission lock (whose holder waits for read 2's landing).
        assert 2 * READ in backend.asked, f"read 2 never got a read slot (asked: {backend.asked})"
        for _ in range(20):  # the rest lands at once; copies run as they are posted
            while posted:
                posted.pop(0)()  # type: ignore[operator]
            await _settle()
            if task.done():
                break
        assert task.done()
        await task
        assert sorted(backend.asked) == [k * READ for k in range(5)]
    finally:
        task.cancel()
        ex.stop()
