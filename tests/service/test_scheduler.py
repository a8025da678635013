"""The priority heap and dispatcher on their own, over the fake engine, on the test's loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from cicada_async.service.metrics import Metrics
from cicada_async.service.repository import Repository
from cicada_async.service.scheduler import Scheduler
from protocols.errors import DeadlineExceeded, Overloaded, ShuttingDown
from protocols.serving import Priority
from tests.fixtures.server import FakeEngine, fake_config, with_model


async def make(**server: Any) -> tuple[Scheduler, Repository, FakeEngine]:
    engine = FakeEngine(load_s=0.01)
    cfg = fake_config(("a", "b"), **server)
    with_model(cfg, "a", max_queue=3)
    repo = Repository(engine, cfg, Metrics())
    sched = Scheduler(repo, max_queue_total=cfg.server.max_queue_total)
    sched.start()
    return sched, repo, engine


def x(v: float) -> dict[str, torch.Tensor]:
    return {"x": torch.full((1, 4), v)}


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_order_priority_deadline_arrival() -> None:
    sched, repo, engine = await make()
    await repo.load("a")
    sched.hold()
    jobs = [
        asyncio.create_task(sched.submit(repo.get("a"), x(1), priority=Priority(5))),
        asyncio.create_task(sched.submit(repo.get("a"), x(2), priority=Priority(5), timeout_s=10)),
        asyncio.create_task(sched.submit(repo.get("a"), x(3), priority=Priority(2))),
        asyncio.create_task(sched.submit(repo.get("a"), x(4), priority=Priority(5))),
    ]
    await settle()
    assert sched.queued("a") == 3  # max_queue=3: the last priority-5 arrival was refused
    with pytest.raises(Overloaded):
        await jobs[3]
    sched.release()
    await asyncio.gather(*jobs[:3])
    assert [v for _, _, v in engine.instances["a"].calls] == [3.0, 2.0, 1.0]
    await sched.aclose()


async def test_one_request_in_engine_at_a_time() -> None:
    sched, repo, engine = await make()
    await repo.load("a")
    inst = engine.instances["a"]
    inst.gate.clear()
    jobs = [asyncio.create_task(sched.submit(repo.get("a"), x(i), priority=Priority.DEFAULT)) for i in range(3)]
    await settle()
    assert len(inst.calls) == 1 and sched.queued("a") == 2
    inst.gate.set()
    await asyncio.gather(*jobs)
    assert len(inst.calls) == 3
    await sched.aclose()


async def test_cancelled_waiter_leaves_the_queue() -> None:
    sched, repo, _ = await make()
    await repo.load("a")
    sched.hold()
    job = asyncio.create_task(sched.submit(repo.get("a"), x(1), priority=Priority.DEFAULT))
    await settle()
    assert sched.queued("a") == 1 and sched.total_queued == 1
    job.cancel()
    await settle()
    assert sched.queued("a") == 0 and sched.total_queued == 0
    await sched.aclose()


async def test_expiry_and_total_bound() -> None:
    sched, repo, _ = await make(max_queue_total=2)
    sched.hold()
    exp = asyncio.create_task(sched.submit(repo.get("a"), x(1), priority=Priority(1), timeout_s=0.02))
    keep = asyncio.create_task(sched.submit(repo.get("b"), x(2), priority=Priority(3)))
    with pytest.raises(DeadlineExceeded):
        await exp
    assert sched.total_queued == 1
    low = asyncio.create_task(sched.submit(repo.get("b"), x(3), priority=Priority(9)))
    await settle()
    high = asyncio.create_task(sched.submit(repo.get("a"), x(4), priority=Priority(1)))  # displaces low
    with pytest.raises(Overloaded):
        await low
    sched.release()
    await asyncio.gather(keep, high)
    await sched.aclose()


async def test_close_fails_queued_and_refuses_new() -> None:
    sched, repo, _ = await make()
    sched.hold()
    job = asyncio.create_task(sched.submit(repo.get("a"), x(1), priority=Priority.DEFAULT))
    await settle()
    await sched.aclose()
    with pytest.raises(ShuttingDown):
        await job
    with pytest.raises(ShuttingDown):
        await sched.submit(repo.get("a"), x(1), priority=Priority.DEFAULT)
