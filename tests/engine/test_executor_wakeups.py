"""One post wakes the worker that runs it, not the whole pool (review-3 C-9).

The oracle is the kernel's count of voluntary context switches per worker thread
(/proc/self/task/<tid>/status): a thread that wakes from a wait and finds nothing to do sleeps
again, one voluntary switch each. With ``notify_all`` every idle worker (up to 32, they never
retire) woke for every ``post_apply``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cicada_async.engine.executor import MAX_THREADS, Executor

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc"),
]


def _switches(tids: list[int]) -> int:
    total = 0
    for tid in tids:
        for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def _full_pool(ex: Executor) -> list[int]:
    """Every worker spawned, then idle: jobs that wait hand the turn back, so the next queued
    job needs a new worker, until MAX_THREADS wait at once."""
    open_ = threading.Event()
    entered = threading.Semaphore(0)

    def waits() -> None:
        entered.release()
        ex.wait_until(open_.is_set)

    futs = [ex.submit(waits) for _ in range(MAX_THREADS)]
    for _ in range(MAX_THREADS):
        assert entered.acquire(timeout=10)
    open_.set()
    ex.wake()
    for f in futs:
        f.result(timeout=10)
    assert ex.threads == MAX_THREADS
    return [t.native_id for t in threading.enumerate()
            if t.name.startswith("wakeups-") and t.native_id is not None]


def test_a_post_wakes_one_idle_worker_not_all() -> None:
    ex = Executor("wakeups")
    ex.start()
    try:
        tids = _full_pool(ex)
        assert len(tids) == MAX_THREADS
        ex.submit(lambda: None).result(timeout=5)  # the pool settles back to idle
        rounds = 200
        before = _switches(tids)
        for _ in range(rounds):
            ran = threading.Event()
            ex.post_apply(ran.set)
            assert ran.wait(5)
        ex.submit(lambda: None).result(timeout=5)
        woke = _switches(tids) - before
        # One worker takes the turn per post (plus the odd extra wake); notify_all made it
        # about MAX_THREADS per post.
        assert woke < 3 * rounds, f"{woke} wake-ups for {rounds} posts on {len(tids)} idle workers"
    finally:
        ex.stop()


def test_jobs_and_waiters_still_progress_with_targeted_wakeups() -> None:
    """Turn-taking after the change: a waiting job sees its applies, queued jobs all run."""
    ex = Executor("wakeups")
    ex.start()
    try:
        _full_pool(ex)
        done = [False]

        def gated() -> str:
            ex.wait_until(lambda: done[0])
            return "gated"

        g = ex.submit(gated)
        others = [ex.submit(lambda i=i: i) for i in range(100)]
        ex.post_apply(lambda: done.__setitem__(0, True))
        assert g.result(timeout=10) == "gated"
        assert [f.result(timeout=10) for f in others] == list(range(100))
    finally:
        ex.stop()
