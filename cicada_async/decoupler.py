"""WeightDecoupler, fetch side: read coroutines stream shards in plan order into their landing.

Reads are admitted strictly in plan order against a byte budget (bytes landed but not yet
applied), run with bounded concurrency, and take a slot from the shared FetchScheduler so
that the most urgent load gets the bandwidth first. Each shard is handed to the executor as
soon as its last read lands, in whatever order that happens.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from protocols.errors import CicadaError, StorageError, StorageTimeout
from protocols.manifest import FileHeader, Plan
from protocols.storage import StorageBackend

from .landing import Landing
from .timeline import Timeline


class FetchScheduler:
    """Read slots shared by every load in the process, granted most urgent first."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, priority: float) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


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
        self._cv = asyncio.Condition()

    async def acquire(self, n: int) -> None:
        async with self._cv:
            await self._cv.wait_for(
                lambda: self.used + n <= self.limit or self.in_flight == 0
            )
            self.used += n
            self.in_flight += 1
            self.peak = max(self.peak, self.used)

    async def landed(self) -> None:
        async with self._cv:
            self.in_flight -= 1
            self._cv.notify_all()

    async def release(self, n: int) -> None:
        async with self._cv:
            self.used -= n
            self._cv.notify_all()


@dataclass
class FetchSettings:
    concurrency: int = 4
    queue_bytes: int = 256 << 20
    read_timeout_s: float = 60.0


class Fetcher:
    """Runs the reads of one plan; calls ``on_landed(shard)`` on the event loop per shard."""

    def __init__(
        self,
        plan: Plan,
        backend: StorageBackend,
        headers: dict[str, FileHeader],
        landing: Landing,
        *,
        settings: FetchSettings,
        scheduler: FetchScheduler,
        priority: Callable[[], float],
        on_landed: Callable[[int], None],
        timeline: Timeline,
    ) -> None:
        self.plan = plan
        self.backend = backend
        self.headers = headers
        self.landing = landing
        self.settings = settings
        self.scheduler = scheduler
        self.priority = priority
        self.on_landed = on_landed
        self.timeline = timeline
        self.budget = ByteBudget(settings.queue_bytes)
        self._pending_reads = [len(s.reads) for s in plan.shards]
        self._pending_shards = [len(r.shards) for r in plan.reads]
        self._order = asyncio.Lock()
        self._next = 0
        self.bytes_read = 0

    @property
    def admitted(self) -> int:
        """Reads admitted so far (a prefix of ``plan.reads``)."""
        return self._next

    def read_done(self, r: int) -> bool:
        """Whether every shard that read ``r`` serves has been applied."""
        return self._pending_shards[r] == 0

    def replan(self, plan: Plan) -> None:
        """Adopt a plan with the same shards whose reads agree with ours up to ``admitted``."""
        keep = 0
        for old, new in zip(self.plan.reads, plan.reads):
            if old != new:
                break
            keep += 1
        if keep < self._next:
            raise ValueError("a new plan must keep every admitted read")
        kept_shards = {s for r in plan.reads[:keep] for s in r.shards}
        self._pending_shards = self._pending_shards[:keep] + [len(r.shards) for r in plan.reads[keep:]]
        for s in plan.shards:
            if s.index not in kept_shards:
                self._pending_reads[s.index] = len(s.reads)
        self.plan = plan

    async def run(self) -> None:
        """Fetch everything; raises the first storage error (other reads are cancelled)."""
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(max(1, min(self.settings.concurrency, len(self.plan.reads)))):
                    tg.create_task(self._worker())
        except* CicadaError as eg:
            raise eg.exceptions[0] from None
        except* TimeoutError:
            raise StorageTimeout(
                f"a weight read took longer than {self.settings.read_timeout_s:g} s"
            ) from None
        except* OSError as eg:
            raise StorageError(f"weight read failed: {eg.exceptions[0]}") from None

    async def _worker(self) -> None:
        while True:
            async with self._order:  # admission strictly in plan order
                i = self._next
                if i >= len(self.plan.reads):
                    return
                self._next += 1
                read = self.plan.reads[i]
                await self.budget.acquire(read.nbytes)
            buf = await self.landing.buffer_for(i, read)
            await self.scheduler.acquire(self.priority())
            try:
                start = self.timeline.now()
                async with asyncio.timeout(self.settings.read_timeout_s):
                    await self.backend.read_into(
                        read.file, read.start, buf, version=self.headers[read.file].version
                    )
                self.timeline.add("fetch", f"read {i}", start, nbytes=read.nbytes)
                self.bytes_read += read.nbytes
            finally:
                self.scheduler.release()
            await self.budget.landed()
            self.landing.read_landed(i, read)
            for s in read.shards:
                self._pending_reads[s] -= 1
                if self._pending_reads[s] == 0:
                    self.on_landed(s)

    async def shard_applied(self, shard: int) -> None:
        """Called (on the loop) once the executor applied ``shard``: frees its reads' budget."""
        for r in self.plan.shards[shard].reads:  # the current plan: replan keeps this shard's reads
            self._pending_shards[r] -= 1
            if self._pending_shards[r] == 0:
                self.landing.read_released(r, self.plan.reads[r])
                await self.budget.release(self.plan.reads[r].nbytes)
