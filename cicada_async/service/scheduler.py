"""Priority heap and dispatcher: which waiting request the engine runs next.

Order: priority (1 most urgent), then deadline, then arrival. One warm request is handed to
the engine at a time, so that this heap, not a queue inside the engine, decides the order; a
strictly more urgent one is handed over at once, and the engine runs it at the running
forward's next layer boundary. A request for an unloaded model starts that model's cold start at once (its own task,
not the warm slot): while its layer-gated forward waits for bytes, the engine runs warm
forwards and other loads meanwhile. Requests for a model that is loading stay in the heap
until it is ready, or until the cold start's forward starts and, with batching on, takes the
compatible ones into its batch. What runs is a batch (``batcher.py``; one request without
batching), and it holds the one warm slot.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cicada_async.service import batcher
from cicada_async.service.pending import Key, Pending, RunStats
from cicada_async.service.repository import ModelEntry, Repository
from protocols.errors import CicadaError, DeadlineExceeded, Overloaded, ShuttingDown
from protocols.serving import Priority, Tensors

log = logging.getLogger("cicada.scheduler")

@dataclass
class _Queue:
    heap: list[tuple[Key, Pending]] = field(default_factory=list)
    live: int = 0


def _retrieve(fut: asyncio.Future[Tensors]) -> None:
    """Mark an abandoned future's exception as seen (no 'never retrieved' warning)."""
    if not fut.cancelled():
        fut.exception()


class Scheduler:
    """Admission (bounded, shedding the lowest priority), ordering, and dispatch."""

    def __init__(self, repo: Repository, *, max_queue_total: int, retry_after_s: float = 1.0,
                 on_shed: Callable[[str, str], None] | None = None,
                 on_batch: Callable[[str, int, int, bool], None] | None = None) -> None:
        self.repo = repo
        self.max_queue_total = max_queue_total
        self.retry_after_s = retry_after_s
        self.on_shed = on_shed or (lambda model, reason: None)
        self.on_batch = on_batch or (lambda model, size, ns, cold: None)  # a successful execution
        self._delays = batcher.Delays(self.kick)  # batches waiting out max_queue_delay_us
        self._queues: dict[str, _Queue] = {}
        self._total = 0
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._warm_running: list[Priority] = []  # priorities of warm requests inside the engine
        self._held = False
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._cold_priority: dict[str, Priority] = {}  # model -> priority of the request that started its load
        repo.queued = self.queued
        repo.on_change = self.kick

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._run(), name="cicada-dispatcher")

    def begin_drain(self) -> None:
        """Stop admitting; what is already queued still runs (SIGTERM contract)."""
        self._closing = True

    async def aclose(self) -> None:
        """Fail whatever is still queued, stop the dispatcher, wait for running requests."""
        self._closing = True
        for q in self._queues.values():
            for _, p in q.heap:
                if p.queued:
                    self._remove(p)
                    self._fail(p, ShuttingDown("server is shutting down"))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def hold(self) -> None:
        """Stop dispatching (requests still queue). For tests and operators draining the engine."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self.kick()

    def kick(self) -> None:
        self._wake.set()

    # -- introspection -------------------------------------------------------------------------
    def queued(self, model: str) -> int:
        q = self._queues.get(model)
        return q.live if q else 0

    @property
    def total_queued(self) -> int:
        return self._total

    # -- admission -----------------------------------------------------------------------------
    async def submit(self, entry: ModelEntry, inputs: Tensors, *, priority: Priority,
                     timeout_s: float | None = None) -> tuple[Tensors, RunStats]:
        """Queue a request and wait for its outputs.

        ``priority`` is already resolved (the wire's 0, "the model's default", is the data
        plane's to turn into the model's level).

        Raises Overloaded (shed), DeadlineExceeded (expired while waiting), ShuttingDown, or
        whatever the engine raised.
        """
        if self._closing:
            raise ShuttingDown("server is shutting down")
        loop = asyncio.get_running_loop()
        now = loop.time()
        # 0.0 is a deadline already passed (gRPC's time_remaining()), not "none".
        deadline = now + timeout_s if timeout_s is not None else math.inf
        p = Pending((priority, deadline, next(self._seq)), entry, inputs, now, loop.create_future())
        self._admit(p)
        if timeout_s is not None:
            p.timer = loop.call_at(deadline, self._expire, p)
        self.kick()
        try:
            if timeout_s is not None:
                # The heap timer answers requests that never started; this bound answers those
                # that did (a cold start riding a slow load, a long forward): nobody waits past
                # their deadline. The work itself cannot be preempted; its result is dropped.
                try:
                    outputs = await asyncio.wait_for(asyncio.shield(p.future), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    if p.queued:
                        self._expire(p)
                        outputs = await p.future  # raises DeadlineExceeded
                    p.future.add_done_callback(_retrieve)
                    self.on_shed(entry.name, "deadline")
                    raise DeadlineExceeded(
                        f"request timeout expired while the model {'loaded' if p.cold else 'ran'} it; "
                        "the result was dropped") from None
            else:
                outputs = await p.future
        finally:
            if p.queued:  # cancelled (client went away) while still waiting
                self._remove(p)
                self.kick()
            if p.timer is not None:
                p.timer.cancel()
        assert p.started is not None and p.finished is not None
        return outputs, RunStats(p.started - p.enqueued, p.finished - p.started, p.cold)

    def hopeless(self, entry: ModelEntry) -> bool:
        """True when a new request for ``entry`` would surely be shed, whatever its priority.

        The server asks before reading a body (the priority is inside it): a full queue whose
        least urgent request already has the most urgent priority can take no newcomer.
        """
        if self._closing:
            return True
        q = self._queues.get(entry.name)
        queues = []
        if q is not None and q.live >= entry.config.max_queue:
            queues.append(q)
        if self._total >= self.max_queue_total:
            queues = list(self._queues.values())
        if not queues:
            return False
        return all(p.priority <= Priority.MOST_URGENT for q in queues for _, p in q.heap if p.queued)

    def _admit(self, new: Pending) -> None:
        q = self._queues.setdefault(new.entry.name, _Queue())
        if q.live >= new.entry.config.max_queue:
            self._shed_one(new, [q], f"model {new.entry.name!r} queue is full ({new.entry.config.max_queue})")
        if self._total >= self.max_queue_total:
            self._shed_one(new, list(self._queues.values()), f"server queue is full ({self.max_queue_total})")
        heapq.heappush(q.heap, (new.key, new))
        q.live += 1
        self._total += 1
        self._set_fetch_priority(new.entry)

    def _shed_one(self, new: Pending, queues: list[_Queue], why: str) -> None:
        """Make room by dropping the least urgent request, which may be the newcomer."""
        worst: Pending | None = None
        for q in queues:
            for _, p in q.heap:
                if p.queued and (worst is None or p.key > worst.key):
                    worst = p
        if worst is None or new.key > worst.key:
            self.on_shed(new.entry.name, "queue_full")
            raise Overloaded(f"{why}; retry later", self.retry_after_s)
        self._remove(worst)
        self.on_shed(worst.entry.name, "displaced")
        self._fail(worst, Overloaded(f"{why}: displaced by a more urgent request; retry later", self.retry_after_s))

    def _remove(self, p: Pending) -> None:
        if not p.queued:
            return
        p.queued = False
        q = self._queues[p.entry.name]
        q.live -= 1
        self._total -= 1
        # Lazy deletion keeps removal O(1); compact when dead items dominate.
        if len(q.heap) > 64 and len(q.heap) > 4 * q.live:
            q.heap = [item for item in q.heap if item[1].queued]
            heapq.heapify(q.heap)

    @staticmethod
    def _fail(p: Pending, exc: BaseException) -> None:
        if p.timer is not None:
            p.timer.cancel()
        if not p.future.done():
            p.future.set_exception(exc)

    def _expire(self, p: Pending) -> None:
        if p.queued:
            self._remove(p)
            self.on_shed(p.entry.name, "deadline")
            self._fail(p, DeadlineExceeded("request timeout expired before the model ran it"))
            self.kick()

    # -- dispatch --------------------------------------------------------------------------------
    def _head(self, q: _Queue) -> Pending | None:
        while q.heap and not q.heap[0][1].queued:
            heapq.heappop(q.heap)
        return q.heap[0][1] if q.heap else None

    def _pop(self, q: _Queue) -> Pending:
        _, p = heapq.heappop(q.heap)
        self._remove(p)
        return p

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._held:
                self._dispatch()

    def _dispatch(self) -> None:
        ready: list[tuple[Key, _Queue]] = []
        now = asyncio.get_running_loop().time()
        for name, q in self._queues.items():
            head = self._head(q)
            while head is not None and head.key[1] <= now:  # timer not fired yet
                self._expire(head)
                head = self._head(q)
            if head is None:
                continue
            entry = head.entry
            if entry.loading is not None or entry.unloading or entry.state == "loading":
                self._set_fetch_priority(entry)
                continue  # wait in the heap; the load's completion kicks us
            if entry.state != "ready":
                self._start([self._pop(q)], cold=True)
                continue
            ready.append((head.key, q))
        # One warm request (or batch) at a time, unless a strictly more urgent one waits: the
        # engine runs it at the running forward's next layer boundary (the executor yields
        # there). Most urgent first; a batch that waits for more requests steps aside meanwhile.
        for key, q in sorted(ready, key=lambda item: item[0]):
            if self._warm_running and key[0] >= min(self._warm_running):
                return
            batch = self._batch(q, now)
            if batch:
                self._start(batch, cold=False)
                return

    def _waiting(self, q: _Queue) -> list[Pending]:
        return sorted((p for _, p in q.heap if p.queued), key=lambda p: p.key)

    def _batch(self, q: _Queue, now: float) -> list[Pending]:
        """What runs next from this ready model's heap: its head, with a batch around it."""
        head = self._head(q)
        assert head is not None
        policy = batcher.policy_for(head.entry.config, head.entry.instance)
        if policy is None:
            return [self._pop(q)]
        run, until = batcher.next_batch(self._waiting(q), policy, now)
        if until is not None:
            self._delays.wake_at(head.entry.name, until)
            return []
        for p in run:
            self._remove(p)
        return run

    def _start(self, batch: list[Pending], *, cold: bool) -> None:
        now = asyncio.get_running_loop().time()
        for p in batch:
            p.cold, p.started = cold, now
        if not cold:
            self._warm_running.append(batch[0].priority)
        entry = batch[0].entry
        entry.busy += len(batch)
        task = asyncio.create_task(self._execute(batch, cold), name=f"cicada-{'cold' if cold else 'run'}-{entry.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if cold:
            self._cold_priority[entry.name] = batch[0].priority
            name = entry.name
            task.add_done_callback(lambda _t: self._cold_priority.pop(name, None))
            self.repo.track_load(entry, task)
            self._set_fetch_priority(entry)

    async def _execute(self, batch: list[Pending], cold: bool) -> None:
        """Run a batch (often of one) and answer each member; ``batch`` grows while a cold
        start gathers the requests that queued for it."""
        entry = batch[0].entry
        loop = asyncio.get_running_loop()
        try:
            if cold:
                try:
                    await self.repo.make_room(entry)
                except BaseException:  # refused by the budget, or cancelled by the drain
                    entry.never_started = True
                    raise
            policy = batcher.policy_for(entry.config, entry.instance)
            join = (lambda: self._join_cold(entry, batch, policy)) if cold and policy is not None else None
            results = await batcher.run(entry.instance, batch, policy, join=join,
                                        ready=lambda: entry.state == "ready",
                                        on_batch=lambda n, ns: self.on_batch(entry.name, n, ns, cold))
        except BaseException as e:  # handed to the waiting handlers, which map it to a status
            err = ShuttingDown("server is shutting down") if isinstance(e, asyncio.CancelledError) else e
            for p in batch:
                p.finished = loop.time()
                self._fail(p, err)
            # The engine leaves a failed model "unloaded" (or "failed"); either way the load is
            # over, and the requests that waited for it share its outcome.
            if cold and isinstance(e, CicadaError) and entry.state != "ready":
                self._fail_waiting(entry, e)
            if not isinstance(e, Exception):
                raise
        else:
            for p, out in zip(batch, results):
                p.finished = loop.time()
                if isinstance(out, BaseException):
                    self._fail(p, out)
                elif not p.future.done():
                    p.future.set_result(out)
        finally:
            entry.busy -= len(batch)
            entry.last_used = time.monotonic()
            if not cold:
                self._warm_running.remove(batch[0].priority)
            self.kick()

    def _join_cold(self, entry: ModelEntry, batch: list[Pending], policy: batcher.Policy) -> None:
        """When the cold start's forward starts: the requests queued meanwhile join its batch."""
        q = self._queues.get(entry.name)
        now = asyncio.get_running_loop().time()
        for p in batcher.gather(batch[0], self._waiting(q) if q else [], policy)[1:]:
            assert isinstance(p, Pending)
            self._remove(p)
            p.cold, p.started = True, now
            entry.busy += 1
            batch.append(p)

    def _fail_waiting(self, entry: ModelEntry, exc: BaseException) -> None:
        """A failed cold start fails the requests that waited for it; later ones retry the load."""
        q = self._queues.get(entry.name)
        if q is None:
            return
        for _, p in q.heap:
            if p.queued:
                self._remove(p)
                p.started = p.finished = asyncio.get_running_loop().time()
                self._fail(p, exc)

    def _set_fetch_priority(self, entry: ModelEntry) -> None:
        """Give a loading model's reads the bandwidth its most urgent waiting request deserves."""
        if entry.loading is None and entry.state != "loading":
            return
        q = self._queues.get(entry.name)
        head = self._head(q) if q else None
        prios = [x for x in (self._cold_priority.get(entry.name), head.priority if head else None) if x is not None]
        if not prios:
            return
        prio = min(prios)
        if prio != entry.fetch_priority:
            entry.fetch_priority = prio
            try:
                entry.instance.set_fetch_priority(prio)
            except CicadaError as e:
                log.warning("set_fetch_priority failed for %s: %s", entry.name, e)
