"""Timeline of one cold start: what ran when, and the figures derived from it."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson


@dataclass
class Span:
    kind: str  # "stage", "fetch", "apply", "compute", "wait", "prefill" (a cold batch)
    name: str
    start: float  # seconds since the cold start began
    end: float
    nbytes: int = 0


@dataclass
class Timeline:
    """Spans recorded from the loop and executor threads (list.append is atomic in CPython)."""

    t0: float = field(default_factory=time.perf_counter)
    spans: list[Span] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    memory: dict[str, Any] | None = None  # rss.MemoryCost of the load, set when it ends

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, kind: str, name: str, start: float, end: float | None = None, nbytes: int = 0) -> None:
        self.spans.append(Span(kind, name, start, self.now() if end is None else end, nbytes))

    def stage(self, name: str) -> "_StageTimer":
        return _StageTimer(self, name)

    def _of(self, kind: str) -> list[Span]:
        return [s for s in self.spans if s.kind == kind]

    def summary(self) -> dict[str, Any]:
        """Derived figures; see docs/timeline.md for definitions."""
        fetch, apply, compute, wait = (self._of(k) for k in ("fetch", "apply", "compute", "wait"))
        stages = {s.name: s.end - s.start for s in self._of("stage")}
        total = max((s.end for s in self.spans), default=0.0)
        nbytes = sum(s.nbytes for s in fetch)
        fetch_span = (max(s.end for s in fetch) - min(s.start for s in fetch)) if fetch else 0.0
        compute_busy = _union(compute)
        first_compute = min((s.start for s in compute), default=None)
        stall = sum(s.end - s.start for s in wait)
        # Overlap efficiency: 1 when the cold start took max(fetch, compute) (perfect overlap),
        # 0 when it took fetch + compute (fully serial).
        shorter = min(fetch_span, compute_busy)
        pipelined = fetch_span + compute_busy - (total - stages.get("skeleton", 0.0) - stages.get("plan", 0.0))
        utilization = max(0.0, min(1.0, pipelined / shorter)) if shorter > 0 else 1.0
        return {
            "total_s": total,
            "time_to_first_compute_s": first_compute,
            "stall_s": stall,
            "utilization": utilization,
            "bytes": nbytes,
            "gbps": nbytes / fetch_span / 1e9 if fetch_span > 0 else None,
            "stages": {
                **stages,
                "fetch_s": fetch_span,
                "apply_s": sum(s.end - s.start for s in apply),
                "compute_s": compute_busy,
            },
            "memory": self.memory,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"summary": self.summary(), "spans": [asdict(s) for s in self.spans]},
            option=orjson.OPT_INDENT_2,
        )

    def plot(self, path: str | Path, title: str = "cold start") -> None:
        """A Gantt chart: one lane per kind, so a person sees where the pipeline waits."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lanes = ["stage", "fetch", "apply", "wait", "compute"]
        colors = {"stage": "#888888", "fetch": "#1f77b4", "apply": "#2ca02c", "wait": "#d62728", "compute": "#ff7f0e"}
        fig, ax = plt.subplots(figsize=(12, 3.5))
        for y, kind in enumerate(lanes):
            spans = [(s.start * 1e3, (s.end - s.start) * 1e3) for s in self._of(kind)]
            if kind == "fetch":  # concurrent reads: stack them in sub-lanes
                ends: list[float] = []
                for start, width in sorted(spans):
                    lane = next((i for i, e in enumerate(ends) if e <= start), len(ends))
                    if lane == len(ends):
                        ends.append(0.0)
                    ends[lane] = start + width
                    h = 0.8 / max(1, 4)
                    ax.broken_barh([(start, width)], (y - 0.4 + (lane % 4) * h, h), color=colors[kind])
            else:
                ax.broken_barh(spans, (y - 0.35, 0.7), color=colors[kind])
        s = self.summary()
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_xlabel("milliseconds since the request")
        ax.set_title(
            f"{title}: total {s['total_s'] * 1e3:.0f} ms, first compute "
            f"{(s['time_to_first_compute_s'] or 0) * 1e3:.0f} ms, stall {s['stall_s'] * 1e3:.0f} ms, "
            f"overlap {s['utilization']:.2f}"
        )
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _union(spans: list[Span]) -> float:
    """Time covered by at least one span (nested compute spans count once)."""
    total, end = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start):
        if s.end <= end:
            continue
        total += s.end - max(s.start, end)
        end = s.end
    return total


class _StageTimer:
    def __init__(self, tl: Timeline, name: str) -> None:
        self.tl, self.name = tl, name

    def __enter__(self) -> None:
        self.start = self.tl.now()

    def __exit__(self, *exc: object) -> None:
        self.tl.add("stage", self.name, self.start)
