"""Compute is shared by priority: a waiting load holds no one back, urgent work goes first.

Review 4.1: a cold start's gated forward used to hold the one executor thread for its whole
fetch, so warm forwards of every other model waited for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from cicada_async.engine.executor import Executor
from cicada_async.engine.runtime import Engine
from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference
from protocols.serving import Priority

pytestmark = pytest.mark.timeout(120)


def _started(ex: Executor) -> Executor:
    ex.start()
    return ex


def test_a_waiting_job_lets_others_run() -> None:
    ex = _started(Executor())
    try:
        waiting, release = threading.Event(), threading.Event()

        def gated() -> str:
            waiting.set()
            ex.wait_until(release.is_set, time.monotonic() + 30)
            return "gated"

        first = ex.submit(gated, priority=Priority(1))
        assert waiting.wait(5)
        # Lower priority than the waiting job, and still not held back by it.
        assert ex.submit(lambda: "warm", priority=Priority(10)).result(timeout=5) == "warm"
        assert not first.done()
        release.set()
        ex.post_apply(lambda: None)  # what a landed shard does: wakes the waiter
        assert first.result(timeout=5) == "gated"
    finally:
        ex.stop()


def test_serialized_baseline_keeps_the_turn_while_waiting() -> None:
    """The switch the benchmark's baseline uses: a waiting job holds everything back."""
    ex = _started(Executor(shared=False))
    try:
        waiting, release = threading.Event(), threading.Event()
        first = ex.submit(lambda: (waiting.set(), ex.wait_until(release.is_set, time.monotonic() + 30)))
        assert waiting.wait(5)
        other = ex.submit(lambda: "warm")
        with pytest.raises(TimeoutError):
            other.result(timeout=0.5)
        release.set()
        ex.post_apply(lambda: None)
        first.result(timeout=5)
        assert other.result(timeout=5) == "warm"
    finally:
        ex.stop()


def test_layer_boundaries_hand_the_turn_to_work_as_urgent_or_more() -> None:
    """A computing job (no waiting) yields at each boundary to equal or more urgent work only."""
    ex = _started(Executor())
    order: list[str] = []
    try:
        running = threading.Event()

        def long_forward() -> None:
            running.set()
            for _ in range(300):
                time.sleep(0.002)  # a layer's compute, holding the turn
                ex.yield_turn()
            order.append("long")

        long = ex.submit(long_forward, priority=Priority(5))
        assert running.wait(5)
        lower = ex.submit(order.append, "lower", priority=Priority(9))
        same = ex.submit(order.append, "same", priority=Priority(5))
        urgent = ex.submit(order.append, "urgent", priority=Priority(1))
        for f in (long, lower, same, urgent):
            f.result(timeout=10)
        assert order == ["urgent", "same", "long", "lower"]
    finally:
        ex.stop()


def test_only_one_job_computes_at_a_time() -> None:
    ex = _started(Executor())
    inside = [0]
    worst = [0]
    lock = threading.Lock()
    release = threading.Event()

    def work(i: int) -> None:
        with lock:
            inside[0] += 1
            worst[0] = max(worst[0], inside[0])
        time.sleep(0.003)
        with lock:
            inside[0] -= 1
        if i % 3 == 0:  # some wait (giving the turn back), then compute again
            ex.wait_until(release.is_set, time.monotonic() + 30)
            with lock:
                inside[0] += 1
                worst[0] = max(worst[0], inside[0])
            time.sleep(0.003)
            with lock:
                inside[0] -= 1
        ex.yield_turn()

    try:
        futs = [ex.submit(work, i, priority=Priority(i % 4)) for i in range(24)]
        time.sleep(0.2)
        release.set()
        ex.post_apply(lambda: None)
        for f in futs:
            f.result(timeout=20)
        assert worst[0] == 1
    finally:
        ex.stop()


def _slow_engine(delay_s: float = 0.02, **kw: object) -> Engine:
    # 16 KiB reads, one at a time, 20 ms each: a tiny model's load takes about a second.
    return Engine(storage={"memory": {"delay_s": delay_s}}, read_bytes=16 << 10, read_concurrency=1,
                  warm_imports=False, **kw)  # type: ignore[arg-type]


async def _warm_latencies_during(engine: Engine, loading: asyncio.Task, warm, inputs) -> list[float]:
    lat: list[float] = []
    while not loading.done() and len(lat) < 200:
        t = time.perf_counter()
        await warm.infer(inputs, priority=Priority(10))
        lat.append(time.perf_counter() - t)
        await asyncio.sleep(0.01)
    return lat


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "serialized"])
async def test_warm_model_is_not_held_back_by_another_models_cold_start(
        model_dirs: dict[str, Path], shared: bool) -> None:
    cold_dir, warm_dir = model_dirs["tiny-gpt2"], model_dirs["tiny-mlp"]
    cold_in, warm_in = inputs_for(cold_dir), inputs_for(warm_dir)
    async with _slow_engine(shared=shared) as engine:
        warm = engine.instance("warm", str(warm_dir))
        cold = engine.instance("cold", f"memory://{cold_dir}")
        await warm.infer(warm_in)
        t0 = time.perf_counter()
        loading = asyncio.create_task(cold.infer(cold_in, priority=Priority(1)))
        await asyncio.sleep(0.15)  # the cold start is in its gated forward, waiting for bytes
        lat = await _warm_latencies_during(engine, loading, warm, warm_in)
        out = await loading
        load_s = time.perf_counter() - t0
    assert_equal_outputs(reference(cold_dir, cold_in), out)
    assert load_s > 0.6, "the slow origin did not make a long cold start"
    if shared:
        # Many warm answers while the other model loads, none of them waiting for its fetch.
        assert len(lat) >= 10 and max(lat) < 0.25 * load_s, (lat, load_s)
    else:
        assert len(lat) <= 2 and max(lat) > 0.5 * (load_s - 0.15), (lat, load_s)


async def test_several_models_cold_start_at_once(model_dirs: dict[str, Path]) -> None:
    names = ["tiny-gpt2", "tiny-bert"]
    async with _slow_engine() as engine:
        insts = [engine.instance(n, f"memory://{model_dirs[n]}") for n in names]
        outs = await asyncio.gather(*(i.infer(inputs_for(model_dirs[n])) for i, n in zip(insts, names)))
        spans = []
        for inst in insts:
            tl = inst.last_timeline
            assert tl is not None
            fwd = [s for s in tl.spans if s.kind == "stage" and s.name == "forward"]
            spans.append((tl.t0 + fwd[0].start, tl.t0 + fwd[0].end))
    for n, out in zip(names, outs):
        assert_equal_outputs(reference(model_dirs[n], inputs_for(model_dirs[n])), out)
    (a0, a1), (b0, b1) = spans
    # Both gated forwards were in flight together: each started before the other ended.
    assert a0 < b1 and b0 < a1, spans


@pytest.mark.parametrize("prioritized", [True, False], ids=["by-priority", "switched-off"])
async def test_fetch_bandwidth_follows_the_most_urgent_load(model_dirs: dict[str, Path], prioritized: bool) -> None:
    """Two loads share one read slot: the urgent one, started later, gets it ahead of the lazy
    one's waiting reads and keeps it; switched off, the slot goes by arrival (the scheduler's
    own record of its grants)."""
    lazy_dir = urgent_dir = model_dirs["tiny-gpt2"]  # the same weights: only priority differs
    done: dict[str, float] = {}
    # 40 ms per read: the lazy load is still fetching (64 KiB reads until planned) when the
    # urgent one arrives.
    async with _slow_engine(0.04, shared=prioritized) as engine:
        lazy = engine.instance("lazy", f"memory://{lazy_dir}")
        urgent = engine.instance("urgent", f"memory://{urgent_dir}")
        grants: list[tuple[Priority, int]] = []
        engine.scheduler.grants = grants
        t0 = time.perf_counter()

        async def run(inst, d: Path, prio: int) -> None:  # type: ignore[no-untyped-def]
            assert_equal_outputs(reference(d, inputs_for(d)), await inst.infer(inputs_for(d), priority=Priority(prio)))
            done[inst.name] = time.perf_counter() - t0

        lazy_task = asyncio.create_task(run(lazy, lazy_dir, 10))
        await asyncio.sleep(0.3)  # the lazy load has its reads queued first
        await asyncio.gather(lazy_task, run(urgent, urgent_dir, 1))
    lazy_prio, urgent_prio = Priority(10), Priority(1)
    order = [p for p, _ in grants]
    assert set(order) == {lazy_prio, urgent_prio}, order
    first, last = order.index(urgent_prio), len(order) - 1 - order[::-1].index(urgent_prio)
    if prioritized:
        # The lazy load kept the slot from read to read until the urgent one asked, handed it
        # over, and got it back only when the urgent fetch was over: three grants in all.
        assert order == [lazy_prio, urgent_prio, lazy_prio], grants
        assert done["urgent"] < done["lazy"], done
    else:
        # Arrival order: every grant to the read that asked first, the two loads taking turns.
        seqs = [seq for _, seq in grants]
        assert seqs == sorted(seqs), grants
        assert lazy_prio in order[first:last], order
