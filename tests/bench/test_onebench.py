"""Two benchmarks never run at once: the second waits for the first's lock, children do not."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HOLD = """
import sys, time
from pathlib import Path
from cicada_async.bench.onebench import one_bench_at_a_time
log = Path(sys.argv[1]); name = sys.argv[2]; hold = float(sys.argv[3])
with one_bench_at_a_time() as waited:
    log.open("a").write(f"{name} in {time.time():.6f} waited {waited:.3f}\\n")
    if len(sys.argv) > 4:  # a child started while the lock is held must not wait for it
        import subprocess
        subprocess.run([sys.executable, "-c", sys.argv[4], str(log)], check=True, timeout=30)
    time.sleep(hold)
    log.open("a").write(f"{name} out {time.time():.6f}\\n")
"""

CHILD = """
import sys, time
from pathlib import Path
from cicada_async.bench.onebench import one_bench_at_a_time
with one_bench_at_a_time() as waited:
    Path(sys.argv[1]).open("a").write(f"child in {time.time():.6f} waited {waited:.3f}\\n")
"""


def _events(log: Path) -> dict[str, float]:
    out = {}
    for line in log.read_text().splitlines():
        name, what, t = line.split()[:3]
        out[f"{name} {what}"] = float(t)
    return out


def test_a_second_benchmark_waits_for_the_first(tmp_path: Path) -> None:
    log = tmp_path / "log"
    env = {"CICADA_BENCH_LOCK": str(tmp_path / "bench.lock"), "PATH": "/usr/bin:/bin"}
    a = subprocess.Popen([sys.executable, "-c", HOLD, str(log), "A", "1.5", CHILD], env=env)
    deadline = time.monotonic() + 30
    while not (log.exists() and "A in" in log.read_text()):
        assert time.monotonic() < deadline, "the first holder never took the lock"
        time.sleep(0.02)
    b = subprocess.run([sys.executable, "-c", HOLD, str(log), "B", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert a.wait(timeout=60) == 0 and b.returncode == 0, b.stderr
    ev = _events(log)
    assert ev["B in"] >= ev["A out"], ev  # B ran only after A let go
    assert "waiting for the benchmark already running" in b.stderr
    assert ev["A in"] <= ev["child in"] <= ev["A out"], ev  # A's child did not wait for A
