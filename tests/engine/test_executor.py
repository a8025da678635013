"""Work posted to the executor fails only its owner: the thread lives, the load fails with its cause."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from backends.memory import Faults, MemoryBackend
from cicada_async.engine.executor import Executor, ExecutorDead
from cicada_async.engine.fetch import FetchScheduler
from cicada_async.engine.job import LoadJob, LoadOptions
from cicada_async.engine.pipeline import LoadRequest, cold_start
from protocols.errors import LoadError
from tests.fixtures.helpers import inputs_for
from protocols.serving import Priority

pytestmark = pytest.mark.timeout(60)


def _boom() -> None:
    raise ZeroDivisionError("boom in posted work")


def test_raising_post_goes_to_its_handler_and_the_thread_lives() -> None:
    ex = Executor()
    ex.start()
    try:
        errors: list[BaseException] = []
        ex.post_apply(_boom, on_error=errors.append)
        ex.post_apply(_boom)  # no handler: logged, still contained
        assert ex.submit(lambda: 42).result(timeout=5) == 42
        assert ex.alive
        assert [type(e) for e in errors] == [ZeroDivisionError]
    finally:
        ex.stop()


def test_raising_post_does_not_surface_in_the_waiting_job() -> None:
    """A job inside wait_until (a gate) applies others' posts; their errors are not its errors."""
    ex = Executor()
    ex.start()
    try:
        ready = threading.Event()
        errors: list[BaseException] = []

        def gated() -> str:
            ready.set()
            ex.wait_until(lambda: done[0], time.monotonic() + 10)
            return "computed"

        done = [False]
        fut = ex.submit(gated)
        assert ready.wait(5)
        ex.post_apply(_boom, on_error=errors.append)
        ex.post_apply(lambda: done.__setitem__(0, True))
        assert fut.result(timeout=5) == "computed"
        assert len(errors) == 1
    finally:
        ex.stop()


async def test_failed_posted_work_fails_the_load_at_once(model_dirs: dict[str, Path]) -> None:
    """A failure in work posted for a load (as a staging copy would) fails that load quickly with
    its cause, is not taken for bad inputs, and leaves the executor serving."""
    d = model_dirs["tiny-gpt2"]
    backend = MemoryBackend.from_dir(d, Faults(delay_s=0.05))  # slow reads: the load is in flight
    ex = Executor()
    ex.start()

    def sabotage(job: LoadJob) -> None:
        job.ledger.post(_boom)

    t0 = time.monotonic()
    try:
        with pytest.raises(LoadError, match="ZeroDivisionError: boom in posted work"):
            await cold_start(backend, ex, FetchScheduler(2), LoadRequest(
                inputs=inputs_for(d), on_prepared=sabotage,
                options=LoadOptions(read_bytes=16 << 10, load_timeout_s=600)))
        assert time.monotonic() - t0 < 20  # not parked until load_timeout_s
        assert await ex.run(lambda: "alive") == "alive"
    finally:
        await backend.aclose()
        ex.stop()


def test_a_killed_worker_fails_queued_and_waiting_work_instead_of_hanging() -> None:
    """What escapes containment (SystemExit from posted work) kills a worker: the executor then
    reports dead, the job waiting for weights fails, the queued job fails, nothing hangs."""
    ex = Executor()
    ex.start()
    try:
        waiting = threading.Event()

        def gated() -> None:
            waiting.set()
            ex.wait_until(lambda: False, time.monotonic() + 30)

        def hold() -> None:
            time.sleep(0.2)  # holds the turn, so the kill lands in the next worker's applies

        first = ex.submit(gated)
        assert waiting.wait(5)
        busy = ex.submit(hold)
        time.sleep(0.05)
        queued = ex.submit(lambda: "never", priority=Priority(5))
        ex.post_apply(lambda: (_ for _ in ()).throw(SystemExit("killed")))
        t0 = time.monotonic()
        busy.result(timeout=5)
        # The job waiting for weights is woken and told the executor stopped under it; the
        # queued one never ran and is told the worker died, and of what.
        with pytest.raises(ExecutorDead, match="^the executor stopped while a job was waiting for weights$"):
            first.result(timeout=10)
        with pytest.raises(ExecutorDead, match=r"^the executor died \(SystemExit: killed\) before this job ran$"):
            queued.result(timeout=10)
        assert time.monotonic() - t0 < 10 and not ex.alive
    finally:
        ex.stop(5)


def test_jobs_after_a_wait_run_on_the_most_recently_idle_worker() -> None:
    """torch's OpenMP gives each computing thread its own helper team: once several workers
    exist (gated jobs waited and others ran meanwhile), later jobs still all run on one thread,
    the one that finished last, instead of whichever of the idle workers woke first."""
    ex = Executor()
    ex.start()
    try:
        release = threading.Event()

        def gated(started: threading.Event) -> int:
            started.set()
            ex.wait_until(release.is_set, time.monotonic() + 10)
            return threading.get_ident()

        waiting = []
        for _ in range(3):  # each waits off the turn, so the next one needs a new worker
            started = threading.Event()
            waiting.append(ex.submit(gated, started))
            assert started.wait(5)
        # While all three wait off the turn, a fourth job runs on a fourth worker, not on the
        # caller's thread nor on a waiting job's.
        fourth = ex.submit(threading.get_ident).result(timeout=5)
        release.set()
        ex.post_apply(lambda: None)  # wakes the gated jobs' checks
        gated_on = {f.result(timeout=5) for f in waiting}
        assert len(gated_on) == 3 and fourth not in gated_on and fourth != threading.get_ident()
        assert ex.threads >= 4
        time.sleep(0.05)  # every worker back in its idle wait
        ran_on = {ex.submit(threading.get_ident).result(timeout=5) for _ in range(50)}
        assert len(ran_on) == 1, f"50 jobs in a row ran on {len(ran_on)} threads"
    finally:
        ex.stop()
