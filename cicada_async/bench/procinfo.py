"""What a benchmark records about where it ran, and the memory a child process holds over time."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from cicada_async.engine.procfs import kib_field, usable_cores

GIB = 1 << 30


def machine() -> dict[str, Any]:
    """CPU count and model, memory, kernel and library versions (without importing torch)."""
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    mem = kib_field("/proc/meminfo", b"MemTotal:") or 0
    versions: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "safetensors", "aiohttp"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "nproc": usable_cores(),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def commit(root: Path | None = None) -> dict[str, Any]:
    """HEAD of the checkout this package runs from, and whether tracked files differ from it."""
    root = root or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


class ChildRss(threading.Thread):
    """Samples a child's VmRSS every ``interval_s`` from just after spawn until ``stop()``.

    ``cost(t0, t1)`` is what a platform bills for holding that process from ``t0`` to ``t1``:
    peak RSS x duration (``gb_seconds``) and the RSS integral (``gb_seconds_held``), GB = 2**30.
    """

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self._halt.is_set():
            try:
                with open(path, "rb") as f:
                    rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith(b"VmRSS:")), None)
            except OSError:
                return  # the child is gone
            if rss is not None:
                self.samples.append((time.time(), rss))
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def cost(self, t0: float, t1: float) -> dict[str, Any]:
        s = [(t, r) for t, r in self.samples if t0 <= t <= t1]
        if not s:
            return {"rss_peak_bytes": None, "gb_seconds": None, "gb_seconds_held": None, "samples": 0}
        # From the spawn to the first sample the process was starting up: count it at the
        # first sample's RSS (an interpreter's few MB), and from the last sample to t1 at the last.
        pts = [(t0, s[0][1]), *s, (t1, s[-1][1])]
        held = sum((b - a) * (ra + rb) / 2 for (a, ra), (b, rb) in zip(pts, pts[1:]))
        peak = max(r for _, r in s)
        return {"rss_peak_bytes": peak, "gb_seconds": peak * (t1 - t0) / GIB,
                "gb_seconds_held": held / GIB, "samples": len(s)}
