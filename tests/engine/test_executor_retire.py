"""Workers spawned for a burst of waiting jobs retire once idle; a few stay for the next job.

Every job that waits (a gated forward) or yields (a refill between pieces) makes the executor
spawn a worker for the next job. Kept for ever, a busy minute left a server with many idle
threads (the soak's idle count grew from 11 to 18). Oracle: the live threads of the process
that carry the executor's name, from ``threading.enumerate``.
"""

from __future__ import annotations

import threading
import time

from cicada_async.engine.executor import KEEP_IDLE, RETIRE_IDLE_S, Executor


def _workers(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(name + "-"))


def test_idle_workers_retire_after_a_burst() -> None:
    ex = Executor("retire-test")
    ex.start()
    try:
        release = threading.Event()
        futs = [ex.submit(ex.wait_until, release.is_set) for _ in range(8)]
        deadline = time.monotonic() + 10
        while _workers("retire-test") < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _workers("retire-test") >= 8  # each waiting job gave its turn to the next
        release.set()
        for f in futs:
            f.result(timeout=10)
        deadline = time.monotonic() + RETIRE_IDLE_S * 5
        while _workers("retire-test") > KEEP_IDLE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _workers("retire-test") <= KEEP_IDLE
        # the kept workers still run work, and a new burst spawns again
        assert ex.submit(lambda: 41 + 1).result(timeout=10) == 42
    finally:
        ex.stop()
