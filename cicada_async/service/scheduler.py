"""Priority heap and dispatcher: which waiting request the engine runs next.

Order: priority (1 most urgent), then deadline, then arrival. One warm request is handed to
the engine at a time, so that this heap, not a queue inside the engine, decides the order; a
strictly more urgent one is handed over at once, and the engine runs it at the running
forward's next layer boundary. A request for an unloaded model starts that model's cold start at once (its own task,
not the warm slot): while its layer-gated forward waits for bytes, the engine runs warm
forwards and other loads meanwhile. Requests for a model that is loading stay in the heap
until it is ready.
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
from typing import Any

import torch

from cicada_async.service.repository import ModelEntry, Repository
from protocols.errors import CicadaError, DeadlineExceeded, Overloaded, ShuttingDown

log = logging.getLogger("cicada.scheduler")

Key = tuple[int, float, int]  # (priority, deadline, arrival sequence)


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
    def priority(self) -> int:
        return self.key[0]


@dataclass
class RunStats:
    """Where a request's time went, for metrics."""

    queue_s: float
    compute_s: float
    cold: bool


@dataclass
class _Queue:
    heap: list[tuple[Key, Pending]] = field(default_factory=list)
    live: int = 0


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's exception as seen (no 'never retrieved' warning)."""
    if not fut.cancelled():
        fut.exception()


class Scheduler:
    """Admission (bounded, shedding the lowest priority), ordering, and dispatch."""

    def __init__(self, repo: Repository, *, max_queue_total: int, retry_after_s: float = 1.0,
                 on_shed: Callable[[str, str], None] | None = None) -> None:
        self.repo = repo
        self.max_queue_total = max_queue_total
        self.retry_after_s = retry_after_s
        self.on_shed = on_shed or (lambda model, reason: None)
        self._queues: dict[str, _Queue] = {}
        self._total = 0
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._warm_running: list[int] = []  # priorities of warm requests inside the engine
        self._held = False
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._cold_priority: dict[str, int] = {}  # model -> priority of the request that started its load
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
    async def submit(self, entry: ModelEntry, inputs: dict[str, torch.Tensor], *, priority: int = 0,
                     timeout_s: float | None = None) -> tuple[dict[str, torch.Tensor], RunStats]:
        """Queue a request and wait for its outputs.

        Raises Overloaded (shed), DeadlineExceeded (expired while waiting), ShuttingDown, or
        whatever the engine raised.
        """
        if self._closing:
            raise ShuttingDown("server is shutting down")
        loop = asyncio.get_running_loop()
        now = loop.time()
        prio = priority or entry.config.default_priority
        deadline = now + timeout_s if timeout_s else math.inf
        p = Pending((prio, deadline, next(self._seq)), entry, inputs, now, loop.create_future())
        self._admit(p)
        if timeout_s:
            p.timer = loop.call_at(deadline, self._expire, p)
        self.kick()
        try:
            if timeout_s:
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
        least urgent request already has priority 1 can take no newcomer.
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
        return all(p.priority <= 1 for q in queues for _, p in q.heap if p.queued)

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
        best: tuple[Key, _Queue] | None = None
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
                self._start(self._pop(q), cold=True)
                continue
            if best is None or head.key < best[0]:
                best = (head.key, q)
        # One warm request at a time, unless a strictly more urgent one waits: the engine then
        # runs it at the running forward's next layer boundary (the executor yields there).
        if best is not None and (not self._warm_running or best[0][0] < min(self._warm_running)):
            self._start(self._pop(best[1]), cold=False)

    def _start(self, p: Pending, *, cold: bool) -> None:
        p.cold = cold
        p.started = asyncio.get_running_loop().time()
        if not cold:
            self._warm_running.append(p.priority)
        p.entry.busy += 1
        task = asyncio.create_task(self._execute(p), name=f"cicada-{'cold' if cold else 'run'}-{p.entry.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if cold:
            self._cold_priority[p.entry.name] = p.priority
            task.add_done_callback(lambda _t, name=p.entry.name: self._cold_priority.pop(name, None))
            self.repo.track_load(p.entry, task)
            self._set_fetch_priority(p.entry)

    async def _execute(self, p: Pending) -> None:
        entry = p.entry
        loop = asyncio.get_running_loop()
        try:
            if p.cold:
                await self.repo.make_room(entry)
            outputs = await entry.instance.infer(p.inputs, priority=p.priority)
        except asyncio.CancelledError:
            self._fail(p, ShuttingDown("server is shutting down"))
            raise
        except BaseException as e:  # handed to the waiting handler, which maps it to a status
            p.finished = loop.time()
            self._fail(p, e)
            # The engine leaves a failed model "unloaded" (or "failed"); either way the load is
            # over, and the requests that waited for it share its outcome.
            if p.cold and isinstance(e, CicadaError) and entry.state != "ready":
                self._fail_waiting(entry, e)
            if not isinstance(e, Exception):
                raise
        else:
            p.finished = loop.time()
            if not p.future.done():
                p.future.set_result(outputs)
        finally:
            entry.busy -= 1
            entry.last_used = time.monotonic()
            if not p.cold:
                self._warm_running: list[int] = []  # priorities of warm requests inside the engine
            self.kick()

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
