"""The drain deadline cancels a cold start still waiting for room in the memory budget (review-3
C-12), not only the engine's loads in flight.

Run on the data plane itself, without the process's exit backstop (which used to hide this: the
server exited at its deadline either way). The oracle: after the drain's load cancelling, the
waiting request has failed as shutting down, and once the busy model goes idle nothing was evicted
and nothing loaded.
"""

from __future__ import annotations

import asyncio

import pytest

from cicada_async.service.config import Config, ModelConfig, ServerConfig
from cicada_async.service.dataplane import DataPlane
from cicada_async.service.lifecycle import stop_loads
from protocols.errors import ShuttingDown
from protocols.serving import ModelOptions, Priority
from tests.fixtures.server import FakeEngine, FakeInstance

pytestmark = pytest.mark.timeout(60)


class Sized(FakeInstance):
    async def size_hint(self) -> int | None:
        return self.engine.model_bytes  # known before the load, as the real engine's


async def test_a_cold_start_waiting_for_room_is_cancelled_at_the_drain_deadline() -> None:
    engine = FakeEngine(load_s=0, model_bytes=1000)
    for n in ("busy", "waiting"):
        engine.instances[n] = Sized(engine, n, f"mem://{n}", ModelOptions())
    models = {n: ModelConfig(name=n, uri=f"mem://{n}", keep_alive_s=None) for n in engine.instances}
    cfg = Config(server=ServerConfig(host="127.0.0.1", port=0, memory_budget_bytes=1500), models=models)
    x = {"x": __import__("torch").ones(1, 4)}
    async with DataPlane(cfg, lambda _c: engine) as dp:
        repo, sched = dp.repository, dp.scheduler
        await repo.load("busy")
        busy = engine.instances["busy"]
        busy.gate.clear()  # its forward runs until the test lets it finish: the model is in use
        running = asyncio.create_task(sched.submit(repo.get("busy"), x, priority=Priority.DEFAULT))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if busy.calls:
                break
        # Only one model fits: this cold start waits for the busy one to go idle.
        waiting = asyncio.create_task(sched.submit(repo.get("waiting"), x, priority=Priority.DEFAULT))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if repo.get("waiting").loading is not None:
                break
        load = repo.get("waiting").loading
        assert load is not None and not load.done() and repo.get("waiting").state == "unloaded"

        dp.begin_drain()
        await stop_loads(dp)  # the drain deadline
        assert load.done(), "the cold start waiting for room outlived the drain's load cancelling"
        with pytest.raises(ShuttingDown):
            await waiting
        busy.gate.set()  # the busy model goes idle: a surviving waiter would evict it and load now
        await running
        await asyncio.sleep(0.1)
        assert busy.unloads == 0 and engine.instances["waiting"].loads == 0
