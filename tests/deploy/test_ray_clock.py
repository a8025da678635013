"""The replica's clock header: its process start agrees with when the process was spawned, and
the bench splits a first answer's wait on Ray's path from it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cicada_async.bench.ray_measures import ray_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_process_start_is_when_the_process_was_spawned() -> None:
    code = ("import time; from cicada_async.service.ray_wire import process_started_at; "
            "time.sleep(0.3); print(process_started_at())")
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    after = time.time()
    started = float(out.stdout.strip())
    # /proc counts in 10 ms ticks and /proc/uptime in 10 ms: 30 ms either side covers both.
    assert before - 0.03 <= started <= after - 0.3 + 0.03, (before, started, after)


def test_the_bench_splits_the_wait_by_the_clock() -> None:
    from cicada_async.service.ray_wire import clock_header

    split = ray_path(100.0, clock_header(101.5, 102.25, 102.5, 103.0))
    assert split == {"process_after_send_s": 1.5, "init_after_process_s": 0.75, "init_s": 0.25,
                     "entered_after_init_s": 0.5, "entered_after_send_s": 3.0}
    assert ray_path(100.0, clock_header(None, 102.25, 102.5, 103.0)) is None
    assert ray_path(100.0, None) is None and ray_path(100.0, "garbage") is None
