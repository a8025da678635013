"""The serving state: what the data plane and every front end read before taking work.

One object per data plane, loop-only (no locks): the drain (SIGTERM), the executor watchdog and
both transports' handler tracking write it; readiness, admission and the drain's deadline read it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class ServingState:
    """Whether the server takes work now, and the handlers it must answer before it stops."""

    draining: bool = False
    """SIGTERM received: readiness is 503, new work is refused, admitted work still runs."""
    restarting: bool = False
    """The executor thread was found dead and is being replaced: readiness 503, infer 503."""
    aborting: bool = False
    """The drain's deadline passed: handlers still in flight are cancelled and answer 503."""
    executor_restarts: int = 0
    """Executor threads replaced since the start."""
    inflight: set[asyncio.Task[object]] = field(default_factory=set)
    """Handlers running now (HTTP and gRPC), which the drain waits for and at its deadline cancels."""
