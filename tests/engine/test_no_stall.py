"""A warm model is not stalled by another model's cold start (issue 28 item 4).

A real warm model (tiny-bert) answers requests while a real, compute-bound cold start of a
bigger made GPT-2 (6 layers of width 384, 256 tokens; its bytes in the page cache, so its
gated forward computes rather than waits) runs on the same engine at the same priority. The
warm model's worst latency during the cold starts must stay within the issue's rule, 2x its
own p99 alone + 50 ms, both measured here in one test on the same machine and load.

Before the executor's slices, a warm forward handed the turn back to the cold start's gated
forward at each of its own layer boundaries: every warm layer waited for one cold layer, and a
3 ms warm request took 100-300 ms (seen failing with worst latencies far over the limit).
"""

from __future__ import annotations

import asyncio
import gc
import mmap
import threading
import time
import weakref
from collections.abc import Awaitable
from pathlib import Path

import numpy as np
import pytest
import torch

from cicada_async.engine.runtime import Engine
from protocols.serving import Priority

from tests.fixtures.helpers import inputs_for

pytestmark = pytest.mark.timeout(120)

PRIORITY = Priority(10)  # both models at one priority, as requests without one are served
ROUNDS = 3


def make_gpt2(dst: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=384, n_layer=6, n_head=6, vocab_size=2048, n_positions=512)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst


async def _timed(coro: Awaitable[object]) -> float:
    t = time.perf_counter()
    await coro
    return time.perf_counter() - t


def ms(xs: list[float]) -> list[float]:
    return [round(x * 1e3, 1) for x in xs]


async def test_warm_latency_during_a_cold_start_stays_within_2x_p99_plus_50ms(
        model_dirs: dict[str, Path], tmp_path: Path) -> None:
    warm_dir = model_dirs["tiny-bert"]
    cold_dir = make_gpt2(tmp_path / "gpt2-made")
    warm_in = inputs_for(warm_dir)
    cold_in = {"input_ids": torch.randint(0, 2048, (1, 256), generator=torch.Generator().manual_seed(0))}
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
            t0 = time.perf_counter()
            loading = asyncio.create_task(cold.infer(cold_in, priority=PRIORITY))
            while not loading.done():
                during.append(await _timed(warm.infer(warm_in, priority=PRIORITY)))
            await loading
            loads.append(time.perf_counter() - t0)
        assert cold.cold_starts == ROUNDS + 1
    p99 = float(np.percentile(alone, 99))
    limit = 2 * p99 + 0.050
    print(f"warm alone p50 {np.percentile(alone, 50) * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms; during {len(during)} "
          f"requests, worst {max(during, default=0) * 1e3:.1f} ms (limit {limit * 1e3:.1f}); cold starts {ms(loads)}")
    assert len(during) >= ROUNDS, ("too few warm requests during the cold starts", ms(during), ms(loads))
    assert max(during) <= limit, (
        f"warm worst {max(during) * 1e3:.1f} ms during cold starts > 2 x p99 alone ({p99 * 1e3:.1f} ms) + 50 ms; "
        f"during: {ms(sorted(during)[-8:])}, cold starts: {ms(loads)}")


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
