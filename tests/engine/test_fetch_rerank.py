"""A load raised while its reads wait for a slot is served at its new priority (review-3 C-16).

``set_fetch_priority`` raises a load's ``LoadPriority``; reads already queued for a read slot
must move up with it, not keep the rank they were queued at.
"""

from __future__ import annotations

import asyncio

import pytest

from cicada_async.engine.fetch import FetchScheduler, LoadPriority
from protocols.serving import Priority

pytestmark = pytest.mark.timeout(30)


async def test_a_waiting_read_moves_up_when_its_load_is_raised() -> None:
    sched = FetchScheduler(1)
    await sched.acquire(Priority(1))  # the only slot, held
    granted: list[str] = []
    background = LoadPriority(Priority(50))  # a load nobody waits for yet
    other = LoadPriority(Priority(10))

    async def read(name: str, p: LoadPriority) -> None:
        await sched.acquire(p)
        granted.append(name)
        sched.release()

    tasks = [asyncio.create_task(read("background", background)), asyncio.create_task(read("other", other))]
    await asyncio.sleep(0.01)  # both queued behind the held slot
    background.set(Priority(2))  # a request at priority 2 now waits for the background load
    sched.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert granted == ["background", "other"]
    assert not sched.contested(Priority(1))
