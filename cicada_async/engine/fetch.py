"""WeightDecoupler, fetch side: read coroutines stream shards in plan order into their landing.

Reads are admitted strictly in plan order against a byte budget (bytes landed but not yet
applied), run with bounded concurrency, and take a slot from the shared FetchScheduler so
that the most urgent load gets the bandwidth first. Each shard is handed to the executor as
soon as its last read lands, in whatever order that happens. The plan's first module (the
embedding a cold prefill waits for) is read alone: no other read is issued until its reads
landed (``first_module_reads``). The byte budget is ``fetchbudget.ByteBudget``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from protocols.errors import CicadaError, StorageError, StorageTimeout
from protocols.manifest import FileHeader, Plan
from protocols.serving import Priority
from protocols.storage import StorageBackend

from cicada_async.engine.executor import AHEAD_OF_REQUESTS
from cicada_async.engine.fetchbudget import ByteBudget
from cicada_async.engine.landing import Landing
from cicada_async.engine.ledger import ShardLedger
from cicada_async.engine.timeline import Timeline


class LoadPriority:
    """A load's read priority: the model instance raises it while a more urgent request waits
    on the load (``set_fetch_priority``); the fetcher reads it before every read."""

    def __init__(self, priority: Priority = AHEAD_OF_REQUESTS) -> None:
        # Unless told, ahead of every request: a load started by a tool or a test.
        self.current = priority

    def set(self, priority: Priority) -> None:
        self.current = priority


_ARRIVAL = Priority(0)  # unprioritized: one level for all, so the arrival sequence decides


class FetchScheduler:
    """Read slots shared by every load in the process, granted most urgent first.

    ``prioritized=False`` grants them in arrival order: the baseline the benchmarks compare to.
    """

    def __init__(self, slots: int, *, prioritized: bool = True) -> None:
        self.slots = slots
        self.prioritized = prioritized
        self._free = slots
        # (rank, arrival, grant, the load's live priority): re-ranked before every grant, so a
        # load raised while its reads wait (set_fetch_priority) moves up at once.
        self._waiters: list[tuple[Priority, int, asyncio.Future[None], LoadPriority | None]] = []
        self._seq = itertools.count()
        # Loads whose fetch runs (Fetcher.run). Read by executor threads without a lock: a
        # forward widens to every core once it is 0 (forward.Widening), a heuristic, not a promise.
        self.fetching = 0
        # Tests set a list: each slot grant is appended as (the load's priority, its arrival
        # number), in the order the slots were granted.
        self.grants: list[tuple[Priority, int]] | None = None

    async def acquire(self, priority: Priority | LoadPriority) -> None:
        """A read slot; ``priority`` may be a load's live priority, read again while it waits."""
        live = priority if isinstance(priority, LoadPriority) else None
        priority = priority.current if isinstance(priority, LoadPriority) else priority
        seq = next(self._seq)
        if self._free > 0 and not self._waiters:
            self._free -= 1
            if self.grants is not None:
                self.grants.append((priority, seq))
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority if self.prioritized else _ARRIVAL, seq, fut, live))
        try:
            await fut
            if self.grants is not None:
                self.grants.append((live.current if live is not None else priority, seq))
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def contested(self, priority: Priority) -> bool:
        """Whether a holder at ``priority`` should hand its slot on after a read.

        A load keeps its slot from read to read while only less urgent loads wait: with one
        read in flight per load, handing it on after every read would alternate the loads
        whatever their priorities. Equal priorities take turns. Unprioritized: always.
        """
        self._rerank()
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)
        if not self._waiters:
            return False
        return not self.prioritized or self._waiters[0][0] <= priority

    def _rerank(self) -> None:
        if self.prioritized and any(w[3] is not None and w[3].current != w[0] for w in self._waiters):
            self._waiters = [(w[3].current if w[3] is not None else w[0], *w[1:]) for w in self._waiters]
            heapq.heapify(self._waiters)

    def release(self) -> None:
        self._rerank()
        while self._waiters:
            _, _, fut, _ = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


@dataclass
class FetchSettings:
    concurrency: int = 4
    queue_bytes: int = 256 << 20
    read_timeout_s: float = 60.0


class Fetcher:
    """Runs the reads of a plan; tells ``ledger`` (on the event loop) as shards' reads are
    admitted and as each shard's last read lands.

    The plan may be replaced while reads run (``replan``): fetching starts in file order
    before the model's skeleton exists, and the dry run re-orders what is left. Admitted reads
    are never changed, only which shards they serve.
    """

    def __init__(
        self,
        plan: Plan,
        backend: StorageBackend,
        headers: dict[str, FileHeader],
        landing: Landing,
        *,
        settings: FetchSettings,
        scheduler: FetchScheduler,
        priority: LoadPriority,
        ledger: ShardLedger,
        timeline: Timeline,
    ) -> None:
        self.plan = plan
        self.backend = backend
        self.headers = headers
        self.landing = landing
        self.settings = settings
        self.scheduler = scheduler
        self.priority = priority
        self.ledger = ledger
        ledger.fetcher = self  # applied shards hand their reads' budget back here
        self.timeline = timeline
        self.budget = ByteBudget(settings.queue_bytes)
        self._order = asyncio.Lock()
        self._admitting = 0  # workers holding or waiting for ``_order`` (loop thread only)
        self._next = 0
        self._landed: set[int] = set()
        self._applied: set[int] = set()
        self._notified: set[int] = set()
        self._released: set[int] = set()  # reads whose budget was given back
        self._given_back: set[int] = set()  # reads whose memory the landing was told to free
        self._acquired: set[int] = set()  # reads holding budget (given back when released)
        self._unlanded: set[int] = set()  # reads counted in the budget's in_flight
        self._stopped = False  # the load failed: nothing more is admitted (forfeit)
        self._more = asyncio.Event()  # set when a replan adds reads for idle workers
        self._final = False
        self._recount()

    @property
    def admitted(self) -> int:
        """Reads admitted so far (a prefix of ``plan.reads``)."""
        return self._next

    def _recount(self) -> None:
        self._pending_reads = [sum(r not in self._landed for r in s.reads) for s in self.plan.shards]
        self._pending_shards = [sum(s not in self._applied for s in r.shards) for r in self.plan.reads]
        self._head = first_module_reads(self.plan, self.headers)

    def _admissible(self) -> bool:
        """The next read may go out: the first module's reads have the storage to themselves
        (a gated forward waits for that module first; reads sharing the disk or the wire with
        it delay it), every other read waits until those already admitted have landed."""
        i = self._next
        return i < len(self.plan.reads) and (
            i in self._head or all(r in self._landed for r in self._head if r < i))

    async def replan(self, plan: Plan, *, final: bool = False) -> None:
        """Adopt ``plan``, whose first ``admitted`` reads cover the same bytes as ours."""
        old = [(r.file, r.start, r.end) for r in self.plan.reads[: self._next]]
        if [(r.file, r.start, r.end) for r in plan.reads[: self._next]] != old:
            raise ValueError("a new plan must keep every admitted read")
        self.plan = plan
        self._final = final
        self._recount()
        for r in range(self._next):
            for s in plan.reads[r].shards:
                self.ledger.reading(s)
        for r in sorted(self._landed):
            self._maybe_release(r)
        for s in range(len(plan.shards)):
            self._maybe_notify(s)
        self._more.set()

    def _maybe_notify(self, s: int) -> None:
        if self._pending_reads[s] == 0 and s not in self._notified and not self._failed():
            self._notified.add(s)
            self.ledger.landed(s)

    def _maybe_release(self, r: int) -> None:
        # Bytes of a read that serves no shard (yet) are already where they belong: its budget
        # goes back at once.
        if r not in self._landed or self._pending_shards[r] != 0:
            return
        if r not in self._released:
            self._released.add(r)
            self.budget.release(self.plan.reads[r].nbytes)
        # Its memory only once the shards it serves are applied: a read that landed before the
        # plan serves none yet, and the plan may give it some whose converted spans are freed
        # then (given back here, it found nothing converted and the raw bytes stayed).
        if r not in self._given_back and (self.plan.reads[r].shards or self._final):
            self._given_back.add(r)
            self.landing.read_released(r, self.plan.reads[r])

    def _failed(self) -> bool:
        """Asked again after every await: a forfeit may have come meanwhile."""
        return self._stopped

    def forfeit(self) -> None:
        """The load failed (loop thread): admit nothing more, hand every held byte back.

        A worker still awaiting a read or the budget finds ``_stopped`` when it resumes and
        ends without touching the budget again.
        """
        self._stopped = True
        held = sorted(self._acquired - self._released)
        self._released.update(held)
        self.budget.give_back(sum(self.plan.reads[r].nbytes for r in held), in_flight=len(self._unlanded))
        self._unlanded.clear()
        self._more.set()

    async def run(self) -> None:
        """Fetch everything; raises the first storage error (other reads are cancelled)."""
        self.scheduler.fetching += 1
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(max(1, self.settings.concurrency)):
                    tg.create_task(self._worker())
        except* CicadaError as eg:
            raise eg.exceptions[0] from None
        except* TimeoutError:
            raise StorageTimeout(
                f"a weight read took longer than {self.settings.read_timeout_s:g} s"
            ) from None
        except* OSError as eg:
            raise StorageError(f"weight read failed: {eg.exceptions[0]}") from None
        finally:
            self.scheduler.fetching -= 1

    @contextlib.asynccontextmanager
    async def _admission(self) -> AsyncIterator[None]:
        """The admission lock, counted while waited for and held (``_admitting``)."""
        self._admitting += 1
        try:
            async with self._order:
                yield
        finally:
            self._admitting -= 1

    async def _worker(self) -> None:
        held = False  # a read slot kept from the last read (see FetchScheduler.contested)
        try:
            while True:
                if held and self._admitting:
                    # A kept slot never waits for anything: the worker that holds the admission
                    # lock may be waiting for budget that only a read in flight frees. Not
                    # ``_order.locked()``: asyncio's lock is fair, so right after a release,
                    # with the next waiter woken but not yet running, it reads unlocked while a
                    # newcomer still queues behind that waiter (the staging CI hang: two slots
                    # kept in that window, the read in flight starved of a slot).
                    self.scheduler.release()
                    held = False
                async with self._admission():  # admission strictly in plan order
                    if self._failed():
                        return
                    while not self._admissible():
                        if held:
                            self.scheduler.release()
                            held = False
                        if self._final and self._next >= len(self.plan.reads):
                            return
                        self._more.clear()
                        await self._more.wait()  # a replan may add reads; the first module lands
                        if self._failed():
                            return
                    i = self._next
                    self._next += 1
                    read = self.plan.reads[i]
                    if held and not self.budget.fits(read.nbytes):
                        self.scheduler.release()  # no slot held idle while the budget is spent
                        held = False
                    await self.budget.acquire(read.nbytes)
                    if self._failed():  # woken by the forfeit's release: give this back
                        self.budget.give_back(read.nbytes, in_flight=1)
                        return
                    self._acquired.add(i)
                    self._unlanded.add(i)
                    for s in read.shards:
                        self.ledger.reading(s)
                if not self.landing.try_reserve(i, read):
                    # A staging slab waits for compute (an earlier read's copy), not storage:
                    # no read slot is kept meanwhile, and no read timeout runs.
                    if held:
                        self.scheduler.release()
                        held = False
                    await self.landing.reserve(i, read)
                    if self._failed():
                        return
                if not held:
                    await self.scheduler.acquire(self.priority)
                    held = True
                    if self._failed():
                        return  # no read for a failed load (the finally passes the slot on)
                start = self.timeline.now()
                async with asyncio.timeout(self.settings.read_timeout_s):
                    await self.landing.fill(i, read, self.backend, self.headers[read.file].version)
                if self._failed():
                    return  # the forfeit counted this read out of the budget already
                self.timeline.add("fetch", f"read {i}", start, nbytes=read.nbytes)
                if self.scheduler.contested(self.priority.current):
                    self.scheduler.release()
                    held = False
                self._unlanded.discard(i)
                self.budget.landed()
                self.landing.read_landed(i, read)
                self._landed.add(i)
                if i in self._head:
                    self._more.set()
                read = self.plan.reads[i]  # the current plan's view of which shards it serves
                for s in read.shards:
                    self._pending_reads[s] -= 1
                    self._maybe_notify(s)
                self._maybe_release(i)
        finally:
            if held:
                self.scheduler.release()

    def shard_applied(self, shard: int) -> None:
        """The ledger (on the loop), once the executor applied ``shard``: frees its reads' budget."""
        self._applied.add(shard)
        for r in self.plan.shards[shard].reads:
            self._pending_shards[r] -= 1
            self._maybe_release(r)


def first_module_reads(plan: Plan, headers: dict[str, FileHeader]) -> frozenset[int]:
    """The reads of the plan's first module (its first shard's module). Before the plan (no
    shards: a stored order's or file order's first reads), those of the tensor the first read
    starts with, which a stored order makes the first module's (the embedding)."""
    if plan.shards:
        first = plan.shards[0].module
        return frozenset(r for s in plan.shards if s.module == first for r in s.reads)
    if not plan.reads or plan.reads[0].file not in headers:
        return frozenset()
    r0 = plan.reads[0]
    ahead = [e for e in headers[r0.file].tensors.values() if e.end > r0.start]
    if not ahead:
        return frozenset()  # no tensor known there: nothing to put first
    t = min(ahead, key=lambda e: e.start)
    return frozenset({0} | {i for i, r in enumerate(plan.reads) if r.file == t.file and r.start < t.end and r.end > t.start})
