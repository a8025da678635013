"""Warm forwards take every usable core while nothing fetches, and torch's setting while a load does.

The server sets torch's intra-op threads to cores - 1 so that a cold start's fetch keeps a core
(``[server] torch_threads``); a warm forward with no load in flight anywhere in the engine has
nothing to leave it for (``Engine(every_core_when_idle=True)``, the server's default).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cicada_async.engine.job import ModelOptions
from cicada_async.engine.runtime import Engine
from tests.fixtures.odd_models import ThreadCount, write_model

pytestmark = pytest.mark.timeout(120)
CORES = len(os.sched_getaffinity(0))
X = {"x": torch.ones(2, 8)}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch's setting is 1 thread, as the server makes it on two cores; restored after."""
    if CORES < 2:
        pytest.skip("needs 2 usable cores to tell every core from one")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


async def threads_of(inst) -> int:  # type: ignore[no-untyped-def]
    out = await inst.infer(dict(X))
    (value,) = set(out["output"].flatten().tolist())
    return int(value)


async def test_idle_warm_forward_takes_every_core_and_a_load_takes_them_back(tmp_path: Path, one_thread: None) -> None:
    d = write_model(ThreadCount, tmp_path / "threads")
    slow = write_model(ThreadCount, tmp_path / "slow", seed=1)
    storage = {"memory": {"delay_s": 1.5}}  # every read of the other model waits: it stays loading
    async with Engine(every_core_when_idle=True, storage=storage) as engine:
        inst = engine.instance("threads", str(d), ModelOptions())
        assert await threads_of(inst) == 1  # the cold start's gated forward: torch's setting
        assert await threads_of(inst) == CORES  # warm, nothing fetching
        other = engine.instance("slow", f"memory://{slow}", ModelOptions())
        loading = asyncio.ensure_future(other.load())
        await asyncio.sleep(0.2)
        assert other.state == "loading"
        assert await threads_of(inst) == 1  # another model's fetch keeps its core
        await asyncio.wait_for(loading, 30)
        assert other.state == "ready"
        assert await threads_of(inst) == CORES
        assert torch.get_num_threads() == 1  # the loop thread's setting was never touched


async def test_off_keeps_torch_setting(tmp_path: Path, one_thread: None) -> None:
    d = write_model(ThreadCount, tmp_path / "threads")
    async with Engine() as engine:
        inst = engine.instance("threads", str(d), ModelOptions())
        await inst.infer(dict(X))
        assert await threads_of(inst) == 1
