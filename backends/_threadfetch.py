"""Ranged GETs run in worker threads, their bodies landing straight in the caller's buffer.

The event loop only schedules: retries, backoff, resumes and cancellation stay async, while
each request (connect, headers, body) runs in a thread on ``backends._wire``. A body is
received with ``recv_into`` into the landing buffer, GIL released, so fetching neither copies
bytes on the loop nor holds the GIL that compute needs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from backends._remote import Fill, RemoteSettings, Transient
from backends._wire import Retryable, Ticket, WirePool
from backends._wireresp import Response
from protocols.errors import StorageError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_S = 10.0
# After a cancel, how long to wait for the aborted thread to let go of the caller's buffer.
# Enough for a thread blocked on its socket (woken at once by the abort); not a bound on one
# still resolving, connecting or in a TLS handshake (see ``backends._wire``), which outlives it.
_ABORT_WAIT_S = 0.5

# Runs in the worker thread on an answer's headers, before its body: raises our errors for
# an unusable answer, else returns how many body bytes come before ``fill.pos`` (0 for a 206).
Check = Callable[[Response], int]
T = TypeVar("T")


def retry_after(resp: Response) -> float | None:
    try:
        return min(float(resp.headers.get("Retry-After", "")), _MAX_RETRY_AFTER_S)
    except ValueError:
        return None


class ThreadFetch:
    """Worker threads and a keep-alive pool for one backend; ``concurrency`` threads."""

    def __init__(
        self,
        settings: RemoteSettings,
        *,
        name: str,
        max_redirects: int = 5,
        cafile: str | None = None,
    ) -> None:
        self.settings = settings
        self.max_redirects = max_redirects
        self.pool = WirePool(
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
            max_idle=settings.concurrency + 2,
            cafile=cafile,
        )
        # One thread per request in flight: the backend's semaphore bounds them.
        self._executor = ThreadPoolExecutor(settings.concurrency + 1, thread_name_prefix=name)
        self._tickets: set[Ticket] = set()
        self._closed = False

    async def get_into(
        self, url: str, headers: Mapping[str, str], fill: Fill, check: Check, what: str
    ) -> None:
        """One GET for the missing tail of ``fill``; failures before headers and retryable
        statuses are retried (``max_attempts``), a body that breaks off raises Transient for
        ``fill_resuming`` to resume from the bytes landed."""
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            may_retry = attempt < s.max_attempts
            try:
                await self._run(
                    lambda ticket: self._once(url, headers, fill, check, may_retry, what, ticket)
                )
                return
            except Retryable as r:
                if not may_retry:
                    raise r.error from None
                await asyncio.sleep(r.delay if r.delay is not None else s.backoff(attempt))

    def _once(
        self,
        url: str,
        headers: Mapping[str, str],
        fill: Fill,
        check: Check,
        may_retry: bool,
        what: str,
        ticket: Ticket,
    ) -> None:
        """Worker thread: one request, its checks and its body into ``fill``."""
        resp = self.pool.get(url, headers, max_redirects=self.max_redirects, ticket=ticket)
        try:
            if resp.status in RETRY_STATUSES and may_retry:
                resp.read_small()  # an error document: read, so the connection can be kept
                raise Retryable(StorageError(f"{what}: HTTP {resp.status}"), retry_after(resp))
            skip = check(resp)
            if skip:
                resp.skip(skip, fill.view[fill.got :])
            while fill.missing:
                n = resp.readinto(fill.view[fill.got :])
                if n == 0:
                    raise Transient(f"body ended {fill.missing} bytes short", short=True)
                fill.got += n
                if ticket.aborted:
                    raise Transient("aborted")
        finally:
            resp.release()

    async def _run(self, fn: Callable[[Ticket], T]) -> T:
        if self._closed:
            raise StorageError("the backend is closed")
        ticket = Ticket()
        self._tickets.add(ticket)
        fut = asyncio.get_running_loop().run_in_executor(self._executor, fn, ticket)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread cannot be cancelled. Shutting its socket down ends a wait on that
            # socket at once, and the bounded wait below then sees the thread let go of the
            # buffer; a pending connect or TLS handshake ends too (backends._wire). What it
            # cannot promise: a thread still in DNS keeps running past the wait (until the
            # resolver's timeout) and only then sees the abort, sending nothing and landing no byte; a
            # thread starved of CPU for longer than the wait may land the bytes of one receive
            # the kernel already held (the right bytes of this range, into the buffer the
            # caller still owns) before it sees the abort. So a cancel returns promptly, but a
            # worker thread may stay busy for as long as the resolver takes after it.
            ticket.abort()
            fut.add_done_callback(_retrieve)
            with contextlib.suppress(Exception):
                await asyncio.wait([fut], timeout=_ABORT_WAIT_S)
            raise
        finally:
            self._tickets.discard(ticket)

    async def aclose(self) -> None:
        self._closed = True
        for ticket in list(self._tickets):
            ticket.abort()
        self.pool.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: an aborted request's error is expected, not news
