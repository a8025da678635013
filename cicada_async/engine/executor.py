"""Where torch runs: jobs on worker threads that take turns computing, most urgent first.

One *turn* exists per executor: only the thread holding it runs torch (two cores do not get
faster by running two forwards at once, and one computing thread keeps priorities honest). A
job that must wait (a gated forward waiting for its next layer's weights, ``wait_all``) gives
the turn back, so the most urgent other work runs meanwhile on another worker thread: warm
forwards of other models, other loads' layers and applies, skeleton builds. At every layer
gate a job also hands the turn over to waiting work of its own priority or more urgent one
(``yield_turn``), so a long forward never holds back a request for more than one layer.

A job that wants the turn back at the holder's own priority (a gated forward whose weights
landed, a job that yielded) waits for the holder's *slice* (``SLICE_S``, about one layer's
compute): a 3 ms warm request took 100-300 ms while gpt2-medium cold-started without it (issue
28 item 4). A new job of that priority waits for ``PIECE_S``; more urgent work for nothing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from protocols.errors import CicadaError, LoadError
from protocols.serving import Priority

T = TypeVar("T")

log = logging.getLogger(__name__)

OnError = Callable[[BaseException], None]
Key = tuple[Priority, int]  # (priority, sequence): lower runs first

# Work submitted without a priority (tools, tests, an unload's last reference): level 0.
AHEAD_OF_REQUESTS = Priority.UNLOAD
# A worker that takes the turn only to run posted applies: no job, so no real key.
_APPLIES_ONLY: Key = (Priority(-(1 << 62)), -1)

MAX_THREADS = 32
# Idle workers kept past a burst; the others retire after RETIRE_IDLE_S without work (each
# holds a stack and an OpenMP team).
KEEP_IDLE = 2
RETIRE_IDLE_S = 1.0
SLICE_S = 0.02  # the turn's slice among jobs of one priority (the module's docstring)
# A new job of the holder's priority waits this long into the turn at fine yield points (a
# submodule built, a shard placed, a layer): 320-layer loads among 1.5 ms requests took 8 s.
PIECE_S = 0.005

_worker_of = threading.local()  # .executor: the executor whose worker this thread is


def yield_point(piece_s: float = 0.0) -> None:
    """A piece boundary of a long job: ``yield_turn(piece_s)`` of the executor running it;
    nothing when called off an executor's worker (a tool or test calling the function)."""
    executor: Executor | None = getattr(_worker_of, "executor", None)
    if executor is not None:
        executor.yield_turn(piece_s)


class ExecutorDead(CicadaError):
    """The executor is not running (stopped)."""


class Executor:
    """Jobs by priority on up to ``max_threads`` workers; one of them computes at a time.

    Weight applies are posted separately (``post_apply``) and run first, whoever holds the
    turn: before the next job, at layer gates, and by a waiting job itself when the turn is free.
    """

    def __init__(self, name: str = "cicada-executor", *, max_threads: int = MAX_THREADS,
                 shared: bool = True) -> None:
        self._name = name
        # shared=False keeps the turn while a job waits (no yields): one load at a time holds
        # all compute (the multi-model benchmark's baseline).
        self._shared = shared
        self._max_threads = max_threads
        # One lock; jobs waiting for weights (wait_until) wait on ``_cv``, each worker on a
        # condition of its own on it. Only ``_idle[-1]`` and ``_wanting[0]`` can act on a
        # change, so only they are woken (``_notify_locked``), not every idle worker (C-9).
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._wakeups: dict[int, threading.Condition] = {}
        self._jobs: list[tuple[Key, Callable[[], object], concurrent.futures.Future[Any]]] = []
        self._applies: collections.deque[tuple[Callable[[], None], OnError | None]] = collections.deque()
        self._wanting: list[tuple[Key, int]] = []  # threads that want the turn back
        self._holder: int | None = None  # thread ident holding the turn
        self._slice_start = 0.0  # when the holder took the turn (monotonic)
        self._seq = itertools.count()
        self._threads: dict[int, threading.Thread] = {}
        self._spawned = itertools.count()  # worker names stay unique as workers retire
        # Idle workers, the most recently idle last: it takes the next job (torch's OpenMP gives
        # each computing thread a team: one warm team, not several contending for the cores).
        self._idle: list[int] = []
        self._started = False
        self._stopping = False
        self._local = threading.local()

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._started:
                return
            self._started = True
            self._spawn_locked()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Let running jobs finish (waiting ones fail), fail queued ones, join the threads."""
        with self._cv:
            self._stopping = True
            jobs, self._jobs = self._jobs, []
            threads = list(self._threads.values())
            self._notify_everyone_locked()
        for _, _, fut in jobs:
            if fut.set_running_or_notify_cancel():  # skips jobs whose caller already gave up
                fut.set_exception(ExecutorDead("the executor was stopped before this job ran"))
        end = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            if t is not threading.current_thread():
                t.join(None if end is None else max(0.0, end - time.monotonic()))

    @property
    def alive(self) -> bool:
        return self._started and not self._stopping

    def on_thread(self) -> bool:
        return threading.get_ident() in self._threads

    @property
    def threads(self) -> int:
        return len(self._threads)

    # submission ----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], *args: Any,
               priority: Priority = AHEAD_OF_REQUESTS) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cv:
            if self._stopping or not self._started:
                raise ExecutorDead("the executor is not running")
            heapq.heappush(self._jobs, ((priority, next(self._seq)), lambda: fn(*args), fut))
            if not self._idle:
                self._spawn_locked()
            self._notify_locked()
        return fut

    async def run(self, fn: Callable[..., T], *args: Any, priority: Priority = AHEAD_OF_REQUESTS) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, priority=priority))

    def post_apply(self, fn: Callable[[], None], on_error: OnError | None = None) -> None:
        """Queue ``fn`` (thread-safe); it runs with the turn as soon as anyone takes it.

        An exception from ``fn`` goes to ``on_error`` (on the worker that ran it), never further:
        it must not kill a worker, nor surface in whatever job happened to be applying.
        """
        with self._cv:
            self._applies.append((fn, on_error))
            self._notify_locked()

    def wake(self) -> None:
        """Wake every waiting job to re-check what it waits for (a load failed: thread-safe)."""
        with self._cv:
            self._notify_locked()

    # on a worker, holding the turn ---------------------------------------------------------
    def run_applies(self) -> None:
        while True:
            with self._cv:
                if not self._applies:
                    return
                fn, on_error = self._applies.popleft()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - contained: handed to its owner
                _report(e, on_error)

    def wait_until(self, done: Callable[[], bool], deadline: float | None = None) -> None:
        """Until ``done()``: apply landed shards, and give the turn to other work meanwhile."""
        key = self._key()
        while True:
            self.run_applies()
            if done():
                return
            with self._cv:
                if self._applies:
                    continue
                if not self._shared:
                    self._check_waiting_locked(deadline)
                    self._cv.wait(1.0 if deadline is None else max(0.0, min(deadline - time.monotonic(), 1.0)))
                    continue
                self._release_locked()
                while True:
                    try:
                        self._check_waiting_locked(deadline)
                    except CicadaError:
                        self._acquire_locked(key)
                        raise
                    # Applies with nobody to run them: this thread takes the turn and runs them.
                    if done() or (self._applies and self._holder is None):
                        break
                    self._cv.wait(1.0 if deadline is None else min(deadline - time.monotonic(), 1.0))
                self._acquire_locked(key)

    def yield_turn(self, piece_s: float = 0.0) -> None:
        """At a layer boundary: let waiting work of this priority (once this turn ran ``piece_s``)
        or a more urgent one run first."""
        if (key := self._current_key()) is None:
            return  # not a job (a forward called directly, outside the executor)
        prio, seq = key
        self.run_applies()
        if not self._shared:
            return
        with self._cv:
            if not self._contested_locked(prio, piece_s):
                return
            self._release_locked()
            # Behind work of the same priority that already waits: a fresh sequence number.
            self._acquire_locked((prio, next(self._seq)))
            self._local.key = (prio, seq)  # its age still ranks it among waiters

    # internals (self._cv held unless said) --------------------------------------------------
    def _check_waiting_locked(self, deadline: float | None) -> None:
        if self._stopping:
            raise ExecutorDead("the executor stopped while a job was waiting for weights")
        if deadline is not None and deadline - time.monotonic() <= 0:
            raise LoadError("timed out waiting for weights to land")

    def _current_key(self) -> Key | None:
        """The key of the job this thread runs (a thread-local), or None outside a job."""
        key: Key | None = getattr(self._local, "key", None)  # threading.local: unset on new threads
        return key

    def _key(self) -> Key:
        key = self._current_key()
        if key is None:
            raise RuntimeError("only a job on the executor may wait or yield")
        return key

    def _contested_locked(self, prio: Priority, piece_s: float = 0.0) -> bool:
        """A queued job more urgent, or as urgent once this turn ran ``piece_s``; or one wanting
        the turn back: more urgent, or as urgent once this holder's slice ran out."""
        held = time.monotonic() - self._slice_start
        queued = self._jobs[0][0][0] if self._jobs else None
        if queued is not None and (queued < prio or (queued == prio and held >= piece_s)) \
                and self._idle_or_spawn_locked():
            return True
        if not self._wanting:
            return False
        wanted = self._wanting[0][0][0]
        return wanted < prio or (wanted == prio and held >= SLICE_S)

    def _idle_or_spawn_locked(self) -> bool:
        """True when a worker can start the queued job once the turn is free."""
        return bool(self._idle) or self._spawn_locked()

    def _release_locked(self) -> None:
        self._holder = None
        if self._jobs and not self._idle:
            self._spawn_locked()
        self._notify_locked()

    def _acquire_locked(self, key: Key) -> None:
        # A job gets the turn back before it returns or raises, even when stopping: its worker
        # gives the turn up after the job, and must not give up another thread's.
        me = threading.get_ident()
        entry = (key, me)
        heapq.heappush(self._wanting, entry)
        wakeup = self._wakeups.get(me, self._cv)  # always a worker: jobs run on workers
        while (self._holder is not None or self._wanting[0] != entry
               or (self._jobs and self._jobs[0][0] < key and self._idle and not self._stopping)):
            wakeup.wait()
        heapq.heappop(self._wanting)
        self._holder = me
        self._slice_start = time.monotonic()
        self._notify_locked()

    def _notify_locked(self) -> None:
        """Wake whoever may act on a change: jobs waiting for weights (they re-check what they
        wait for; one per waiting gate or load, not per worker), the idle worker that would
        start the next job or run posted applies, and the head of the line for the turn.
        Other idle workers and later wanters cannot act until these two move, and whatever
        moves them notifies again."""
        self._cv.notify_all()
        if self._idle:
            self._wakeups[self._idle[-1]].notify()
        if self._wanting:
            self._wakeups[self._wanting[0][1]].notify()

    def _notify_everyone_locked(self) -> None:
        """Stopping or a dead worker: every thread must see it."""
        self._cv.notify_all()
        for wakeup in self._wakeups.values():
            wakeup.notify_all()

    def _job_may_start_locked(self) -> bool:
        return (self._holder is None and bool(self._jobs)
                and (not self._wanting or self._jobs[0][0] < self._wanting[0][0]))

    def _spawn_locked(self) -> bool:
        if len(self._threads) >= self._max_threads or self._stopping:
            return False
        t = threading.Thread(target=self._worker, name=f"{self._name}-{next(self._spawned)}", daemon=True)
        t.start()
        assert t.ident is not None  # started: it has an ident
        self._threads[t.ident] = t
        self._wakeups[t.ident] = threading.Condition(self._lock)
        self._idle.append(t.ident)
        return True

    def _may_retire_locked(self, me: int) -> bool:
        """An idle worker past the kept few, never the next to run (``_idle[-1]``), may exit."""
        return len(self._idle) > KEEP_IDLE and self._idle[-1] != me and me in self._idle

    def _worker(self) -> None:
        me = threading.get_ident()
        _worker_of.executor = self
        call: Callable[[], object] | None
        fut: concurrent.futures.Future[Any] | None
        while True:
            with self._cv:
                while True:
                    if self._stopping and not self._jobs:
                        self._idle.remove(me)
                        self._threads.pop(me, None)
                        self._notify_everyone_locked()
                        return
                    if self._idle[-1] == me:  # the most recently idle worker is next
                        if self._job_may_start_locked():
                            key, call, fut = heapq.heappop(self._jobs)
                            break
                        if self._applies and self._holder is None:
                            key, call, fut = _APPLIES_ONLY, None, None
                            break
                    if not self._wakeups[me].wait(RETIRE_IDLE_S) and self._may_retire_locked(me):
                        self._idle.remove(me)
                        self._threads.pop(me, None)
                        self._wakeups.pop(me, None)
                        return
                self._holder = me
                self._slice_start = time.monotonic()
                self._idle.pop()
            try:
                self._run_turn(key, call, fut)
            except BaseException as e:  # noqa: BLE001 - only what escapes containment (SystemExit)
                self._die(e, fut)
                return
            # This frame waits for the next job: it must not keep the last one's outputs alive.
            call = fut = None
            with self._cv:
                self._idle.append(me)
                self._holder = None
                self._notify_locked()

    def _die(self, e: BaseException, current: concurrent.futures.Future[Any] | None) -> None:
        """A worker was killed: nothing may wait for it. Queued jobs fail, waiting ones wake and
        fail, and ``alive`` turns False so that the server's watchdog replaces the executor."""
        log.error("executor worker died: %s: %s", type(e).__name__, e, exc_info=e)
        with self._cv:
            self._stopping = True
            jobs, self._jobs = self._jobs, []
            self._holder = None
            self._threads.pop(threading.get_ident(), None)
            self._notify_everyone_locked()
        futs = [fut for _, _, fut in jobs] + ([current] if current is not None else [])
        for fut in futs:
            if fut.done():
                continue
            if fut.running() or fut.set_running_or_notify_cancel():
                fut.set_exception(ExecutorDead(f"the executor died ({type(e).__name__}: {e}) before this job ran"))

    def _run_turn(self, key: Key, call: Callable[[], object] | None,
                  fut: concurrent.futures.Future[Any] | None) -> None:
        self.run_applies()
        if call is None or fut is None or not fut.set_running_or_notify_cancel():
            return
        self._local.key = key
        try:
            result = call()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
            fut.set_exception(e)
        else:
            fut.set_result(result)
            del result
        finally:
            self._local.key = None


def _report(e: BaseException, on_error: OnError | None) -> None:
    if on_error is not None:
        try:
            on_error(e)
            return
        except Exception:  # noqa: BLE001 - a failing handler must not kill the thread either
            log.exception("error handler of posted work failed")
    log.error("posted work failed: %s: %s", type(e).__name__, e, exc_info=e)
