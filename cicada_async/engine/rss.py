"""What a cold start costs in memory-time: the process's RSS sampled while it runs.

A serverless platform bills the memory a container holds for as long as it holds it, in
GB-seconds (AWS Lambda, Cloud Run, Knative on a metered cluster). ``RssSampler`` reads the
process's resident set (VmRSS of /proc/self/status) at the start of a cold start, every
``interval_s`` on the event loop while it runs, and at its end, and reports

- ``gb_seconds``: peak sampled RSS x duration, the bill if the container's memory must be
  sized for the peak (what platforms charge: the configured memory, for the whole duration);
- ``gb_seconds_held``: the integral of RSS over the duration (trapezoids between samples),
  the memory actually held.

GB is 2**30 bytes, as in the platforms' pricing (1024 MB = 1 GB). RSS is process-wide: it
includes the interpreter, torch, other loaded models and any load running at the same time,
and it counts file pages mapped from the page cache (the mapped landing's weights) but not
the page cache itself. ``resource.getrusage``'s maxrss is not used: it is the process's peak
since it started, so it cannot say what one cold start held.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from cicada_async.engine.procfs import kib_field

GIB = 1 << 30
INTERVAL_S = 0.02  # 50 reads of a small /proc file per second: invisible next to a load


def rss_bytes() -> int:
    """This process's resident set size now (0 where /proc is unavailable)."""
    return kib_field("/proc/self/status", b"VmRSS:") or 0


@dataclass
class MemoryCost:
    """RSS over one cold start; see the module docstring for the definitions."""

    seconds: float
    rss_start_bytes: int
    rss_peak_bytes: int
    rss_end_bytes: int
    samples: int
    gb_seconds: float
    gb_seconds_held: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RssSampler:
    """Samples RSS on the running loop from ``start()`` to ``stop()``."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._cost: MemoryCost | None = None

    def start(self) -> "RssSampler":
        self._sample()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cicada-rss")
        return self

    def _sample(self) -> None:
        self._samples.append((time.monotonic(), rss_bytes()))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._sample()

    def stop(self) -> MemoryCost:
        """The last sample and the cost; idempotent (a failed load's cleanup may call it again)."""
        if self._cost is None:
            if self._task is not None:
                self._task.cancel()  # not awaited: it ends at its next wake-up, sampling nothing
            self._sample()
            self._cost = cost_of(self._samples)
        return self._cost


def cost_of(samples: list[tuple[float, int]]) -> MemoryCost:
    """The cost of (time, rss) samples, in time order."""
    t0, t1 = samples[0][0], samples[-1][0]
    held = sum((b - a) * (ra + rb) / 2 for (a, ra), (b, rb) in zip(samples, samples[1:]))
    peak = max(r for _, r in samples)
    return MemoryCost(
        seconds=t1 - t0, rss_start_bytes=samples[0][1], rss_peak_bytes=peak, rss_end_bytes=samples[-1][1],
        samples=len(samples), gb_seconds=peak * (t1 - t0) / GIB, gb_seconds_held=held / GIB,
    )
