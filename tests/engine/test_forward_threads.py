"""Every forward of the engine runs on one torch thread count, set when it starts.

A reduction is split by the thread count, so a forward on another count answers differently in
the last bits (issue 24, item 4): the server sets every usable core once
(``procfs.forward_threads``); with ``Engine(every_core_when_idle=True)`` and a lower process
setting, a forward (warm, or a cold start's gated one from its first layer) takes every core
and gives the setting back at its end; nothing changes the count inside a forward.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cicada_async.engine.job import ModelOptions
from cicada_async.engine.procfs import forward_threads, threads_while_fetching
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


async def test_warm_forward_takes_every_core_and_gives_the_setting_back(tmp_path: Path, one_thread: None) -> None:
    d = write_model(ThreadCount, tmp_path / "threads")
    async with Engine(every_core_when_idle=True) as engine:
        inst = engine.instance("threads", str(d), ModelOptions())
        await inst.infer(dict(X))  # the cold start
        assert await threads_of(inst) == CORES  # warm, nothing fetching
        assert torch.get_num_threads() == 1  # given back at the forward's end
        fresh: list[int] = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join(10)
        assert fresh == [1]  # T-9: a thread that starts after the widened forward gets the setting


def test_the_server_sets_every_core_for_every_forward() -> None:
    # One count whatever fetches: the cold forward used to run on cores - 1.
    assert forward_threads() == threads_while_fetching() == CORES


async def test_off_keeps_torch_setting(tmp_path: Path, one_thread: None) -> None:
    d = write_model(ThreadCount, tmp_path / "threads")
    async with Engine() as engine:
        inst = engine.instance("threads", str(d), ModelOptions())
        await inst.infer(dict(X))
        assert await threads_of(inst) == 1


async def test_gated_forward_runs_on_one_count_from_first_layer_to_last(tmp_path: Path, one_thread: None) -> None:
    """First layer: the last layer's reads are still on the wire; last layer (after a pause
    longer than those reads): nothing fetches. Both on every core (the count never changes
    inside the forward, so the cold answer is the warm one); off: torch's setting, both."""
    d = write_model(ThreadsPerLayer, tmp_path / "layers", dim=256)  # 256 KiB per layer
    # Reads of 64 KiB (4 x read_bytes before the plan), one at a time, 0.1 s each: about 0.4 s
    # for the first layer's weights, 1 s for all, against the pause's 1.5 s.
    storage = {"memory": {"delay_s": 0.1}}
    for every_core, want in ((True, [CORES, CORES]), (False, [1, 1])):
        async with Engine(every_core_when_idle=every_core, storage=storage, read_concurrency=1,
                          read_bytes=16 << 10, plan_files=False, warm_imports=False) as engine:
            inst = engine.instance("layers", f"memory://{d}", ModelOptions())
            out = await inst.infer(dict(X256))
            assert out["output"][0].tolist() == want
            tl = inst.last_timeline
            assert tl is not None
            first = next(s for s in tl.spans if s.kind == "compute" and s.name == "first")
            assert any(s.kind == "fetch" and s.end > first.start for s in tl.spans)  # still fetching
        assert torch.get_num_threads() == 1  # given back at the forward's end
