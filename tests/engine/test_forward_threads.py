"""Forwards take every usable core while nothing fetches, and torch's setting while a load does.

The server sets torch's intra-op threads to cores - 1 so that a cold start's fetch keeps a core
(``[server] torch_threads``); a warm forward with no load in flight anywhere in the engine has
nothing to leave it for (``Engine(every_core_when_idle=True)``, the server's default), and a
cold start's gated forward widens at the first layer gate after every fetch ended.
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
from tests.fixtures.odd_models import ThreadCount, ThreadsPerLayer, write_model

pytestmark = pytest.mark.timeout(120)
CORES = len(os.sched_getaffinity(0))
X = {"x": torch.ones(2, 8)}
X256 = {"x": torch.ones(2, 256)}


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
        await inst.infer(dict(X))  # the cold start (its fetch may end before the only gate)
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


async def test_gated_forward_widens_once_the_fetch_is_over(tmp_path: Path, one_thread: None) -> None:
    """First layer: the last layer's reads are still on the wire, torch's setting. Last layer
    (after a pause longer than those reads): nothing fetches, every core. Off: torch's setting."""
    d = write_model(ThreadsPerLayer, tmp_path / "layers", dim=256)  # 256 KiB per layer
    # Reads of 64 KiB (4 x read_bytes before the plan), one at a time, 0.1 s each: about 0.4 s
    # for the first layer's weights, 1 s for all, against the pause's 1.5 s.
    storage = {"memory": {"delay_s": 0.1}}
    for every_core, want in ((True, [1, CORES]), (False, [1, 1])):
        async with Engine(every_core_when_idle=every_core, storage=storage, read_concurrency=1,
                          read_bytes=16 << 10, plan_files=False, warm_imports=False) as engine:
            inst = engine.instance("layers", f"memory://{d}", ModelOptions())
            out = await inst.infer(dict(X256))
            assert out["output"][0].tolist() == want
            tl = inst.last_timeline
            assert tl is not None
            first = next(s for s in tl.spans if s.kind == "compute" and s.name == "first")
            assert any(s.kind == "fetch" and s.end > first.start for s in tl.spans)  # still fetching
        assert torch.get_num_threads() == 1  # the loop thread's setting was never touched
