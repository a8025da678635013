"""A warm model is not stalled by another model's cold start (issue 28 item 4).

A real warm model (tiny-bert) answers requests while a real cold start of a made GPT-2 runs on
the same engine at the same priority, in each of the two ways a load can go:
- evicted: the cold model's files are dropped from the page cache (posix_fadvise DONTNEED,
  checked with mincore) before each load, so it takes the pipeline and its gated forward. A
  wide GPT-2 (6 layers of width 384, 256 tokens): its forward is compute-bound.
- resident: its files stay in the page cache, so it takes the resident path. A deep, narrow
  GPT-2 (96 layers of width 32): thousands of tensors, so the skeleton build, the plan and the
  placement are long enough to show a turn that does not yield.
The warm model's worst latency during the cold starts must stay within the issue's rule, 2x its
own p99 alone + 50 ms, both measured here in one test on the same machine and load; the
timeline of every load says which path it took.

The objects alive before the test are frozen for its duration (``gc.freeze``), as a served
process's imports are (engine/importgc.py): this test process imported torch and transformers
outside that, and a full collection over its ~450k objects held the GIL for 215-276 ms in the
middle of the resident loads (measured with gc.callbacks), a stall of pytest's making.

What each case caught: before the executor's slices (bf4bbcf), a warm forward handed the turn
back to the gated forward at each of its own layer boundaries, every warm layer waited for one
cold layer, and a 3 ms warm request took 100-300 ms (the evicted case). Before the resident
path's placement yielded, the skeleton build and the placement each held one turn (the
resident case).
"""

from __future__ import annotations

import asyncio
import gc
import mmap
import threading
import time
import weakref
from collections.abc import Awaitable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cicada_async.bench.pagecache import make_cold, residency, weight_files
from cicada_async.engine.runtime import Engine
from protocols.serving import Priority

from tests.fixtures.helpers import inputs_for

pytestmark = pytest.mark.timeout(180)

PRIORITY = Priority(10)  # both models at one priority, as requests without one are served
ROUNDS = 3
# The cold model of each case: GPT-2 (layers, width, tokens of the first request).
CASES = {"evicted": (6, 384, 256), "resident": (96, 32, 64)}


def make_gpt2(dst: Path, layers: int, width: int) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=width, n_layer=layers, n_head=2, vocab_size=2048, n_positions=512)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst


async def _timed(coro: Awaitable[object]) -> float:
    t = time.perf_counter()
    await coro
    return time.perf_counter() - t


def ms(xs: list[float]) -> list[float]:
    return [round(x * 1e3, 1) for x in xs]


async def _evicted(d: Path) -> None:
    """Drop the files' pages; the unloaded model's mapping goes on the unmapper thread, and
    a live mapping keeps its pages, so try until mincore sees none."""
    for _ in range(50):
        state = make_cold(d)
        assert state.trusted, "mincore cannot see these files' page cache"
        if state.resident_bytes == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{state.resident_bytes} of {state.total_bytes} B still resident after eviction")


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("frozen_heap")
@pytest.mark.parametrize("case", list(CASES))
async def test_warm_latency_during_a_cold_start_stays_within_2x_p99_plus_50ms(
        case: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    layers, width, tokens = CASES[case]
    warm_dir = model_dirs["tiny-bert"]
    cold_dir = make_gpt2(tmp_path / "gpt2-made", layers, width)
    warm_in = inputs_for(warm_dir)
    cold_in = {"input_ids": torch.randint(0, 2048, (1, tokens), generator=torch.Generator().manual_seed(0))}
    async with Engine() as engine:
        warm = engine.instance("warm", str(warm_dir))
        cold = engine.instance("cold", str(cold_dir))
        await cold.infer(cold_in, priority=PRIORITY)  # page cache and plan file: later loads compute
        for _ in range(20):
            await warm.infer(warm_in, priority=PRIORITY)
        alone = [await _timed(warm.infer(warm_in, priority=PRIORITY)) for _ in range(100)]
        during: list[float] = []
        loads: list[float] = []
        for _ in range(ROUNDS):
            await cold.unload()
            if case == "evicted":
                await _evicted(cold_dir)
            else:
                assert residency(weight_files(cold_dir)).fraction == 1.0
            t0 = time.perf_counter()
            loading = asyncio.create_task(cold.infer(cold_in, priority=PRIORITY))
            while not loading.done():
                during.append(await _timed(warm.infer(warm_in, priority=PRIORITY)))
            await loading
            loads.append(time.perf_counter() - t0)
            assert cold.last_timeline is not None
            spans = cold.last_timeline.spans
            took = "resident" if any(s.kind == "stage" and s.name == "resident" for s in spans) else "pipelined"
            assert took == ("pipelined" if case == "evicted" else "resident"), (case, took)
            assert (case == "evicted") == any(s.kind == "fetch" for s in spans)
        assert cold.cold_starts == ROUNDS + 1
    p99 = float(np.percentile(alone, 99))
    limit = 2 * p99 + 0.050
    print(f"{case}: warm alone p50 {np.percentile(alone, 50) * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms; during "
          f"{len(during)} requests, worst {max(during, default=0) * 1e3:.1f} ms (limit {limit * 1e3:.1f}); "
          f"cold starts {ms(loads)}")
    assert len(during) >= ROUNDS, ("too few warm requests during the cold starts", ms(during), ms(loads))
    assert max(during) <= limit, (
        f"{case}: warm worst {max(during) * 1e3:.1f} ms during cold starts > 2 x p99 alone ({p99 * 1e3:.1f} ms)"
        f" + 50 ms; during: {ms(sorted(during)[-8:])}, cold starts: {ms(loads)}")


async def test_unload_unmaps_the_weight_files_off_the_executor(
        model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Unload drops the model on the executor, holding the turn; the mapping's munmap (60-240 ms
    for gpt2-medium, measured) runs on the unmapper thread instead, so no warm request waits
    for it. The oracle: the thread on which each mapped file's mmap object is finalized."""
    from backends.local import LocalBackend

    d = model_dirs["tiny-gpt2"]
    unmapped_on: list[str] = []
    map_file = LocalBackend.map_file

    def watched(self: LocalBackend, key: str, size: int) -> mmap.mmap:
        m = map_file(self, key, size)
        weakref.finalize(m, lambda: unmapped_on.append(threading.current_thread().name))
        return m

    monkeypatch.setattr(LocalBackend, "map_file", watched)
    gc.disable()  # reference counting only: the last reference decides the thread
    try:
        async with Engine() as engine:
            inst = engine.instance("m", str(d))
            await inst.infer(inputs_for(d))
            assert not unmapped_on, "the mapping went before the model"
            await inst.unload()
            for _ in range(200):
                if unmapped_on:
                    break
                await asyncio.sleep(0.01)
    finally:
        gc.enable()
    assert unmapped_on == ["cicada-unmap"], unmapped_on


def test_a_prebuild_copies_the_spare_in_pieces() -> None:
    """The server's prebuild (ReadySkeleton.build on the executor at Priority.BACKGROUND, no
    yield point passed) copies the spare one submodule at a time too: a request queued while
    it copies runs between two pieces, not after the whole copy (54 ms for gpt2-medium)."""
    from cicada_async.engine.executor import Executor
    from cicada_async.engine.ready import ReadySkeleton
    from tests.engine import test_ready_refill_yields as marked

    ex = Executor()
    ex.start()
    try:
        ready = ReadySkeleton("m")
        ready.wanted = True
        marked.LOG.clear()
        requests: list[object] = []
        marked.ON_FIRST_MARK.append(lambda: requests.append(
            ex.submit(marked.LOG.append, "request", priority=Priority.DEFAULT)))
        ex.submit(ready.build, marked.SPEC, None, priority=Priority.BACKGROUND).result(timeout=10)
        assert ready.ready
        assert requests, "the copy never reached a marked module"
        # The pristine's build copies nothing; the spare's copy reaches "a", then "b".
        assert marked.LOG in (["a", "request", "b"], ["b", "request", "a"]), \
            f"{marked.LOG}: the request waited for the whole copy"
    finally:
        marked.ON_FIRST_MARK.clear()
        ex.stop()
