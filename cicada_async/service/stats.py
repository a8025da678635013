"""Per-model inference statistics in the shape of Triton's statistics extension.

Recorded where an infer request completes, by whichever transport answered it (HTTP or
gRPC), and read by ``GET /v2/models[/{m}[/versions/{v}]]/stats`` and gRPC ModelStatistics.
Loop-only state: no locks.

What each duration counts here (Triton's names, cicada's stages):

* ``success`` / ``fail``: requests answered with outputs / with an error once their model was
  known (precheck refusals such as an unknown model or a full queue are not counted), and
  their whole time in the server;
* ``queue``: admission to the start of the forward (a cold start's wait for its own load is
  compute, not queue: that request runs the pipelined forward);
* ``compute_input``: decoding the wire tensors (JSON, binary or protobuf) into torch tensors;
* ``compute_infer``: the forward, including a cold start's layer-gated load;
* ``compute_output``: encoding the outputs for the wire.

``inference_count`` counts successful requests, ``execution_count`` the model executions that
answered them: with dynamic batching one execution answers several requests (and
``batch_stats`` counts executions by batch size, with their forward's time as
``compute_infer``); without it the two are equal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    """A count and the nanoseconds they took together."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, int(ns))


@dataclass
class Outcome:
    """What one request's path through the server measured, filled in as it goes."""

    decode_ns: int = 0
    queue_ns: int | None = None  # None until the scheduler returned (it did not run otherwise)
    compute_ns: int = 0
    encode_ns: int = 0


@dataclass
class ModelStats:
    """Triton's ModelStatistics for one model version."""

    name: str
    version: str = "1"
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    durations: dict[str, Duration] = field(default_factory=lambda: {k: Duration() for k in DURATIONS})
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> executions, forward ns

    def as_dict(self) -> dict[str, Any]:
        """The JSON form tritonclient's ``get_inference_statistics()`` returns."""
        return {"name": self.name, "version": self.version, "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {k: {"count": d.count, "ns": d.ns} for k, d in self.durations.items()},
                "batch_stats": [{"batch_size": n, "compute_input": {"count": 0, "ns": 0},
                                 "compute_infer": {"count": d.count, "ns": d.ns},
                                 "compute_output": {"count": 0, "ns": 0}} for n, d in sorted(self.batches.items())]}


class Stats:
    """Statistics of every model that has been asked for, by name."""

    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}

    def of(self, name: str) -> ModelStats:
        s = self.models.get(name)
        if s is None:
            s = self.models[name] = ModelStats(name)
        return s

    def record(self, name: str, ok: bool, total_ns: int, outcome: Outcome) -> None:
        s = self.of(name)
        d = s.durations
        d["success" if ok else "fail"].add(total_ns)
        s.last_inference_ms = time.time_ns() // 1_000_000
        if not ok:
            return
        s.inference_count += 1
        d["queue"].add(outcome.queue_ns or 0)
        d["compute_input"].add(outcome.decode_ns)
        d["compute_infer"].add(outcome.compute_ns)
        d["compute_output"].add(outcome.encode_ns)

    def execution(self, name: str, size: int, ns: int) -> None:
        """One successful model execution that answered ``size`` requests."""
        s = self.of(name)
        s.execution_count += 1
        s.batches.setdefault(size, Duration()).add(ns)
