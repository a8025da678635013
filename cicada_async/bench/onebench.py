"""One benchmark at a time on a machine: every ``cicada bench`` waits for the one running.

Two benchmarks sharing two cores measure nothing, and nothing in a report would show it. The
lock is a ``flock`` on a file every user of the machine can open; the kernel drops it when the
holder exits, so a killed benchmark never leaves it stuck. Processes a benchmark starts inherit
``CICADA_BENCH_HELD`` and do not wait for their own parent.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_ENV = "CICADA_BENCH_LOCK"
HELD_ENV = "CICADA_BENCH_HELD"
DEFAULT_LOCK = Path("/tmp/cicada-bench-run.lock")


@contextlib.contextmanager
def one_bench_at_a_time() -> Iterator[float]:
    """Hold the machine's benchmark lock; yields the seconds spent waiting for it."""
    if os.environ.get(HELD_ENV) == "1":
        yield 0.0
        return
    path = Path(os.environ.get(LOCK_ENV) or DEFAULT_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    t0 = time.monotonic()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            print(f"cicada bench: waiting for the benchmark already running (pid {holder}, lock {path})", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        os.environ[HELD_ENV] = "1"
        try:
            yield time.monotonic() - t0
        finally:
            os.environ.pop(HELD_ENV, None)
    finally:
        os.close(fd)  # closing the only descriptor releases the flock
