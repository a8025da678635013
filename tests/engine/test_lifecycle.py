"""Engine lifecycle: executor death is noticed and repaired; unload and reload."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import threading
from pathlib import Path

from cicada_async.engine.runtime import Engine

from tests.fixtures.helpers import assert_equal_outputs, extra_threads, inputs_for, reference


async def test_dead_executor_is_noticed_and_restarted(model_dirs):
    d = model_dirs["tiny-mlp"]
    inputs = inputs_for(d)
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        await inst.infer(inputs)
        engine.executor.stop()  # what a crashed thread looks like from outside
        assert not engine.healthy
        await engine.restart_executor()
        assert engine.healthy and inst.state == "unloaded"
        out = await inst.infer(inputs)
    assert_equal_outputs(reference(d, inputs), out)


async def test_unload_then_reload_reuses_plan(model_dirs, tmp_path):
    # A copy of its own: plans are stored beside the model's files, and a plan another test
    # left in the shared fixture (one in registration order was found there in a CI run at
    # 1d8d372) would be this test's first plan.
    d = Path(shutil.copytree(model_dirs["tiny-gpt2"], tmp_path / "tiny-gpt2", ignore=shutil.ignore_patterns(".cicada")))
    inputs = inputs_for(d)
    before = set(threading.enumerate())
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        first = await inst.infer(inputs)
        plan = inst._plan
        await inst.unload()
        assert inst.state == "unloaded" and inst._model is None
        second = await inst.infer(inputs)
        assert inst.cold_starts == 2 and inst._plan is not None
        assert inst._plan.modules == plan.modules
        assert inst._plan.order_source == plan.order_source == "dry-forward"
        stages = {s.name for s in inst.last_timeline.spans if s.kind == "stage"}
        assert "dry-run" not in stages, "the reload ran the dry forward again instead of reusing the plan"
    assert_equal_outputs(first, second)
    assert extra_threads(before) == []


async def test_first_answer_is_not_kept_after_it_was_read(model_dirs):
    """The cold request's outputs go to that request only: the instance holds no copy of them
    (outside the memory budget) until the next load."""
    import gc
    import weakref

    d = model_dirs["tiny-gpt2"]
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        out = await inst.infer(inputs_for(d))
        assert inst.state == "ready" and inst._first_outputs is None
        ref = weakref.ref(next(iter(out.values())))
        del out
        for _ in range(5):
            await asyncio.sleep(0.01)  # let the loop run the wake-ups that still pass it along
        gc.collect()
        assert ref() is None, "something still holds the first answer's tensors"


def _open_fds_under(path: str) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(path)
        except OSError:  # closed while listing
            pass
    return n


async def test_unload_closes_the_weight_files_without_the_cycle_collector(model_dirs):
    """An unloaded model's mapped weight files close when the model goes, not at the next gc:
    a load that leaves a reference cycle behind keeps every mapping open in a long-lived server."""
    d = model_dirs["tiny-mlp"]
    inputs = inputs_for(d)
    gc.collect()
    gc.disable()
    try:
        async with Engine() as engine:
            inst = engine.instance("m", str(d))
            for _ in range(3):
                assert_equal_outputs(reference(d, inputs), await inst.infer(inputs))
                assert inst.state == "ready"
                await inst.unload()
                assert _open_fds_under(str(d)) == 0
    finally:
        gc.enable()
