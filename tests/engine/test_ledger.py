"""A shard has one owner: every shard of a real cold start ends ``released``, a failed load
leaves none in a non-terminal state and its byte budget fully returned, and an illegal move
of a shard raises."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backends.memory import Faults, MemoryBackend
from cicada_async.engine import pipeline
from cicada_async.engine.executor import Executor
from cicada_async.engine.fetch import Fetcher, FetchScheduler, FetchSettings
from cicada_async.engine.job import LoadOptions
from cicada_async.engine.ledger import TERMINAL, IllegalTransition, ShardBudget, ShardLedger, ShardState
from cicada_async.engine.pipeline import LoadRequest, cold_start
from protocols.errors import LoadError, StorageError

from tests.fixtures.helpers import inputs_for

# Small reads and a small budget: many shards, several reads each, admission held by the budget.
SMALL = dict(options=LoadOptions(read_bytes=16 << 10, load_timeout_s=60),
             fetch=FetchSettings(concurrency=3, queue_bytes=96 << 10))


@pytest.fixture
def ledgers(monkeypatch: pytest.MonkeyPatch) -> list[ShardLedger]:
    """Every ledger the cold starts of a test make (a failed one returns nothing to inspect)."""
    made: list[ShardLedger] = []

    class Recorded(ShardLedger):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            self.closed_fetcher: ShardBudget | None = None
            made.append(self)

        def close(self) -> None:
            # The cold start lets go of its fetcher at its end: keep it to inspect the budget.
            self.closed_fetcher = self.fetcher
            super().close()

    monkeypatch.setattr(pipeline, "ShardLedger", Recorded)
    return made


def _budget(ledger: ShardLedger) -> tuple[int, int]:
    fetcher = getattr(ledger, "closed_fetcher", None)  # set by the fixture's Recorded ledger
    assert ledger.fetcher is None, "the cold start ended without letting go of its fetcher"
    assert isinstance(fetcher, Fetcher)
    return fetcher.budget.used, fetcher.budget.in_flight


@pytest.mark.parametrize("with_inputs", [True, False], ids=["gated-forward", "load-only"])
async def test_every_shard_of_a_cold_start_ends_released(model_dirs: dict[str, Path], ledgers: list[ShardLedger],
                                                          with_inputs: bool) -> None:
    d = model_dirs["tiny-gpt2"]
    backend = MemoryBackend.from_dir(d)
    ex = Executor()
    ex.start()
    try:
        _, outputs, job = await cold_start(backend, ex, FetchScheduler(3), LoadRequest(
            inputs=inputs_for(d) if with_inputs else None, **SMALL))  # type: ignore[arg-type]
    finally:
        await backend.aclose()
        await asyncio.to_thread(ex.stop)
    assert (outputs is not None) == with_inputs
    [ledger] = ledgers
    assert ledger is job.ledger and ledger.error is None
    assert len(ledger.states) == len(job.plan.shards) > 3
    assert ledger.states == [ShardState.RELEASED] * len(ledger.states)
    assert _budget(ledger) == (0, 0)


@pytest.mark.parametrize("fail_after", [0, 300 << 10, 600 << 10], ids=["first-read", "midway", "late"])
async def test_a_failed_read_leaves_no_shard_in_flight_and_the_budget_returned(
        model_dirs: dict[str, Path], ledgers: list[ShardLedger], fail_after: int) -> None:
    d = model_dirs["tiny-gpt2"]
    # The headers and config are read before the weights: failures are counted past them.
    # Slow reads: the plan (and its shards) exists before a later read fails.
    backend = MemoryBackend.from_dir(d, Faults(fail_after_bytes=fail_after + 4096, delay_s=0.01 if fail_after else 0))
    ex = Executor()
    ex.start()
    try:
        with pytest.raises((StorageError, LoadError)):
            await cold_start(backend, ex, FetchScheduler(3), LoadRequest(inputs=inputs_for(d), **SMALL))  # type: ignore[arg-type]
        assert await ex.run(lambda: "alive") == "alive"
    finally:
        await backend.aclose()
        await asyncio.to_thread(ex.stop)
    [ledger] = ledgers
    assert ledger.error is not None
    assert all(s in TERMINAL for s in ledger.states), ledger.states
    if fail_after:  # failed midway: some shards were applied and released, the rest dropped
        assert ledger.count(ShardState.RELEASED) > 0 and ledger.count(ShardState.DROPPED) > 0
    else:  # failed before the plan: its shards are dropped as they are planned, or never exist
        assert ledger.count(ShardState.RELEASED) == 0
    assert _budget(ledger) == (0, 0)


async def test_a_failure_from_an_apply_goes_through_the_same_path(model_dirs: dict[str, Path],
                                                                   ledgers: list[ShardLedger]) -> None:
    """Work posted for the load (as a staging copy) fails: the same end state as a read failure."""
    d = model_dirs["tiny-gpt2"]
    backend = MemoryBackend.from_dir(d, Faults(delay_s=0.02))

    def boom() -> None:
        raise ZeroDivisionError("boom")

    ex = Executor()
    ex.start()
    try:
        with pytest.raises(LoadError, match="ZeroDivisionError: boom"):
            await cold_start(backend, ex, FetchScheduler(3), LoadRequest(
                inputs=inputs_for(d), on_prepared=lambda job: job.ledger.post(boom), **SMALL))  # type: ignore[arg-type]
    finally:
        await backend.aclose()
        await asyncio.to_thread(ex.stop)
    [ledger] = ledgers
    assert all(s in TERMINAL for s in ledger.states)
    assert _budget(ledger) == (0, 0)


async def test_an_illegal_transition_raises() -> None:
    ex = Executor()
    ex.start()
    try:
        ledger = ShardLedger(ex, asyncio.get_running_loop())
        applied: list[int] = []
        ledger.plan(2, applied.append)
        with pytest.raises(IllegalTransition, match="shard 0: planned -> applied"):
            ledger.applied(0)
        ledger.reading(1)
        ledger.landed(1)
        with pytest.raises(IllegalTransition, match="shard 1: landed -> landed"):
            ledger.landed(1)
        with pytest.raises(IllegalTransition, match="planned once"):
            ledger.plan(2, applied.append)
        ledger.fail(LoadError("stop"))
        assert ledger.states == [ShardState.DROPPED, ShardState.DROPPED]
        ledger.applied(1)  # an apply that finished as the load failed: ignored, not a bug
        assert ledger.states[1] is ShardState.DROPPED
    finally:
        await asyncio.to_thread(ex.stop)
