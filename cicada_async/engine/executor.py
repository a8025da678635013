"""The one dedicated thread where torch runs: weight applies and forward passes."""

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

T = TypeVar("T")

log = logging.getLogger(__name__)

OnError = Callable[[BaseException], None]


class ExecutorDead(CicadaError):
    """The executor thread is not running (stopped, or died)."""


class Executor:
    """Runs jobs one at a time on its own thread, most urgent first.

    Weight applies are posted separately and always run before the next job, and also while a
    job waits inside ``wait_until`` — a gated forward waiting for layer k keeps applying
    whatever shards land, so a single thread both loads and computes.
    """

    def __init__(self, name: str = "cicada-executor") -> None:
        self._name = name
        self._cv = threading.Condition()
        self._jobs: list[tuple[Any, int, Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._applies: collections.deque[tuple[Callable[[], None], OnError | None]] = collections.deque()
        self._seq = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the current job, fail queued ones, and join the thread."""
        with self._cv:
            self._stopping = True
            jobs, self._jobs = self._jobs, []
            self._cv.notify_all()
        for *_, fut in jobs:
            if fut.set_running_or_notify_cancel():  # skips jobs whose caller already gave up
                fut.set_exception(ExecutorDead("the executor was stopped before this job ran"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # submission ----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], *args: Any, priority: Any = 0) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cv:
            if self._stopping or self._thread is None:
                raise ExecutorDead("the executor is not running")
            heapq.heappush(self._jobs, (priority, next(self._seq), lambda: fn(*args), fut))
            self._cv.notify_all()
        return fut

    async def run(self, fn: Callable[..., T], *args: Any, priority: Any = 0) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, priority=priority))

    def post_apply(self, fn: Callable[[], None], on_error: OnError | None = None) -> None:
        """Queue ``fn`` (thread-safe); it runs on the executor thread as soon as it is free.

        An exception from ``fn`` goes to ``on_error`` (on the executor thread), never further:
        it must not kill the thread, nor surface in whatever job happened to be applying.
        """
        with self._cv:
            self._applies.append((fn, on_error))
            self._cv.notify_all()

    # on the executor thread ----------------------------------------------------------------
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
        """Block the executor thread until ``done()``, applying landed shards meanwhile."""
        while True:
            self.run_applies()
            if done():
                return
            with self._cv:
                if self._applies:
                    continue
                if self._stopping:
                    raise ExecutorDead("the executor stopped while a job was waiting for weights")
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    raise LoadError("timed out waiting for weights to land")
                self._cv.wait(timeout if timeout is None else min(timeout, 1.0))

    def _loop(self) -> None:
        while True:
            self.run_applies()
            with self._cv:
                while not self._jobs and not self._applies and not self._stopping:
                    self._cv.wait()
                if self._applies:
                    continue
                if self._stopping and not self._jobs:
                    return
                _, _, call, fut = heapq.heappop(self._jobs)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
                fut.set_exception(e)
            else:
                fut.set_result(result)
            # This frame waits for the next job: it must not keep the last one's outputs alive.
            call = fut = result = None  # type: ignore[assignment]


def _report(e: BaseException, on_error: OnError | None) -> None:
    if on_error is not None:
        try:
            on_error(e)
            return
        except Exception:  # noqa: BLE001 - a failing handler must not kill the thread either
            log.exception("error handler of posted work failed")
    log.error("posted work failed: %s: %s", type(e).__name__, e, exc_info=e)
