"""The record of one admitted request, shared by the scheduler (heap, dispatch) and the batcher."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from cicada_async.service.repository import ModelEntry
from protocols.serving import Priority

Key = tuple[Priority, float, int]  # (priority, deadline, arrival sequence): the heap's order


@dataclass(eq=False)
class Pending:
    """One admitted request, waiting in a model's heap or running."""

    key: Key
    entry: ModelEntry
    inputs: dict[str, torch.Tensor]
    enqueued: float
    future: asyncio.Future[dict[str, torch.Tensor]]
    timer: asyncio.TimerHandle | None = None
    queued: bool = True  # still in the heap (lazy deletion: heaps keep dead items until popped)
    started: float | None = None
    finished: float | None = None
    cold: bool = False

    @property
    def priority(self) -> Priority:
        return self.key[0]


@dataclass
class RunStats:
    """Where a request's time went, for metrics."""

    queue_s: float
    compute_s: float
    cold: bool
