"""The fetch's byte budget: bytes admitted but not yet applied bound what is read ahead."""

from __future__ import annotations

import asyncio


class ByteBudget:
    """Bytes admitted but not yet applied; admission waits while the budget is spent.

    A shard is applied only when all its reads have landed, so when every admitted read has
    landed and the budget is still spent, the shards holding it are waiting for reads not yet
    admitted: the next read is admitted anyway. That bounds the overshoot by one window and
    makes a deadlock impossible whatever the plan.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.in_flight = 0
        # Waiters re-check ``fits`` when woken. Landing and release are plain calls (loop
        # thread): the ledger hands bytes back from a callback, with nothing to await.
        self._waiters: list[asyncio.Future[None]] = []

    def fits(self, n: int) -> bool:
        return self.used + n <= self.limit or self.in_flight == 0

    async def acquire(self, n: int) -> None:
        while not self.fits(n):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.used += n
        self.in_flight += 1
        self.peak = max(self.peak, self.used)

    def landed(self) -> None:
        self.in_flight -= 1
        self._wake()

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def give_back(self, n: int, *, in_flight: int) -> None:
        """A failed load's ``n`` bytes, ``in_flight`` of its reads never landing: all returned."""
        self.in_flight -= in_flight
        self.release(n)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
