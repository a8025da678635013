"""The connection layer, below routing and auth: caps, header and idle timeouts, parser errors.

aiohttp accepts every connection, waits for headers without a deadline of its own and answers
its parser's errors in text/plain, echoing the offending bytes (an Authorization line
included) and logging a traceback each. ``GuardedHandler`` is aiohttp's protocol with:

* a cap on open connections, total and per peer address, checked at accept: a connection
  beyond a cap takes one of ``health_reserved_connections`` probe-only slots (health answered,
  anything else 503 + Connection: close), or is closed at once when those are taken too;
* a header timeout from the connection's opening (or a later request's first byte) to the end
  of its headers, so idle and slowloris connections go away before auth could ever run;
* parser errors as a fixed JSON body with Connection: close, logged in one line with no
  request bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestHandler

from cicada_async.service.config import ServerConfig
from cicada_async.service.responses import error_response
from protocols.errors import ConfigError

log = logging.getLogger("cicada.server")
HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
# Parser refusals by status. Fixed text: the parser's own message quotes the request bytes.
_PARSER_MESSAGES = {400: "malformed HTTP request", 413: "request line or headers too large",
                    415: "Content-Encoding is not accepted; send the body uncompressed",
                    417: "unsupported Expect header", 431: "request header fields too large"}


def _json(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    # Connection: close spelled out: the parser's answers are HTTP/1.0, where aiohttp omits it.
    resp = web.Response(body=orjson.dumps({"error": message}), status=status, content_type="application/json",
                        headers={**(headers or {}), "Connection": "close"})
    resp.force_close()
    return resp


def _json_http_errors(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                      ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """HTTP errors raised outside the middlewares (aiohttp's Expect handler) as JSON too."""
    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e)

    return guarded


class ConnectionGuard:
    """Counts of open connections, total and per peer; loop-only state, no lock needed."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.open = 0
        self.probe_slots = 0
        self.per_peer: Counter[str] = Counter()
        self.refused = 0
        # Probe-slot connections that have not sent a complete request yet, oldest first.
        self.idle_probes: dict[GuardedHandler, None] = {}

    def admit(self, peer: str) -> str | None:
        """'full' (a normal slot), 'probe' (health only) or None (close at once).

        When every probe slot is taken, the oldest one still waiting for its request is
        evicted for the newcomer: a real probe sends its request at once and is answered in
        milliseconds, so connections parked in the reserve cannot starve it.
        """
        if self.open < self.cfg.max_open_connections and self.per_peer[peer] < self.cfg.max_connections_per_peer:
            self.open += 1
            self.per_peer[peer] += 1
            return "full"
        if self.probe_slots >= self.cfg.health_reserved_connections and self.idle_probes:
            next(iter(self.idle_probes)).evict()
        if self.probe_slots < self.cfg.health_reserved_connections:
            self.probe_slots += 1
            return "probe"
        self.refused += 1
        return None

    def release(self, peer: str, slot: str) -> None:
        if slot == "probe":
            self.probe_slots -= 1
            return
        self.open -= 1
        self.per_peer[peer] -= 1
        if self.per_peer[peer] <= 0:
            del self.per_peer[peer]


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, bounded by a ``ConnectionGuard``."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        handler = self._request_handler
        assert handler is not None  # aiohttp takes it from the manager; None only once shut down
        self._request_handler = _json_http_errors(handler)
        self._guard = guard
        self._peer = "?"
        self._slot: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False  # bytes of a request whose headers are not complete yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"
        self._slot = self._guard.admit(self._peer)
        if self._slot is None:
            # Closed before aiohttp starts a task for it: costs one accept, holds no fd.
            transport.abort()  # type: ignore[attr-defined]
            return
        if self._slot == "probe":
            handler = self._request_handler
            assert handler is not None  # set in __init__, cleared only at shutdown
            self._request_handler = self._probe_only(handler)
            self._guard.idle_probes[self] = None
        super().connection_made(transport)
        self._arm_header_timer()

    def _release(self) -> None:
        self._guard.idle_probes.pop(self, None)
        if self._slot is not None:
            self._guard.release(self._peer, self._slot)
            self._slot = None

    def evict(self) -> None:
        """Give this probe slot to a newer connection (released now, not at connection_lost)."""
        self._release()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._release()
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._header_timer is None and not self._request_in_progress and not self._messages:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        if data and self._header_timer is not None:
            self._partial = True
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # headers complete (or refused): the handler takes over
            self._disarm_header_timer()
            self._guard.idle_probes.pop(self, None)  # a probe with its request: not evictable

    # -- header timeout ----------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._partial = False
        self._header_timer = self._loop.call_later(self._guard.cfg.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        if self._partial:
            body = orjson.dumps({"error": f"request headers not received within {self._guard.cfg.header_timeout_s} s"})
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        self.force_close()

    # -- probe-only slots --------------------------------------------------------------------
    def _probe_only(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        retry = str(max(1, round(self._guard.cfg.retry_after_s)))

        async def probe_only(request: web.BaseRequest) -> web.StreamResponse:
            if request.method == "GET" and request.path in HEALTH_PATHS:
                resp = await handler(request)
            else:
                resp = _json(503, "too many open connections; retry later", {"Retry-After": retry})
            resp.force_close()
            return resp

        return probe_only

    # -- parser errors -----------------------------------------------------------------------
    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's refusals as fixed JSON, logged in one line without the request's bytes."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        headers = None
        if isinstance(exc, ContentEncodingError):  # e.g. zstd without a decoder installed
            status, headers = 415, {"Accept-Encoding": "identity"}
        kind = type(exc).__name__ if exc is not None else "error"
        if status >= 500:
            log.error("unhandled error in the HTTP layer", extra={"event": "http_error", "kind": kind})
            return _json(500, "internal server error")
        log.info("refused a malformed HTTP request", extra={"event": "bad_http", "status": status, "kind": kind,
                                                              "peer": self._peer})
        return _json(status, f"{_PARSER_MESSAGES.get(status, 'malformed HTTP request')} ({kind})", headers)


class GuardedServer(web.Server):
    """aiohttp's connection factory, making ``GuardedHandler`` protocols."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


# aiohttp's private internals the guard relies on (pyproject pins aiohttp to the tested range).
# A release that renames one would silently switch off the caps or the header timer (fail
# open), so the server checks them all at start and refuses to run without them.
HANDLER_INTERNALS = ("_request_handler", "_request_in_progress", "_messages", "_request_count", "_loop",
                     "transport", "connection_made", "connection_lost", "data_received", "handle_error")
SERVER_INTERNALS = ("_loop", "_kwargs", "request_handler", "request_factory", "handler_cancellation")
RUNNER_INTERNALS = ("_make_server",)


def check_internals(loop: asyncio.AbstractEventLoop) -> None:
    """Raise ConfigError naming every internal of aiohttp the guard needs and cannot find."""
    async def no_handler(request: web.BaseRequest) -> web.StreamResponse:  # pragma: no cover
        raise web.HTTPNotFound()

    server = web.Server(no_handler, loop=loop)  # instance attributes: web.Server has no slots
    missing = [f"RequestHandler.{n}" for n in HANDLER_INTERNALS if not hasattr(RequestHandler, n)]
    missing += [f"web.Server.{n}" for n in SERVER_INTERNALS if not hasattr(server, n)]
    # AppRunner's own: BaseRunner declares _make_server abstract, which would pass hasattr.
    missing += [f"web.AppRunner.{n}" for n in RUNNER_INTERNALS if n not in vars(web.AppRunner)]
    if missing:
        import aiohttp

        raise ConfigError(f"aiohttp {aiohttp.__version__} lacks internals the connection guard needs "
                          f"({', '.join(missing)}); install the version range pinned in pyproject.toml")


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a ``GuardedServer``; refuses to exist (ConfigError) on an
    aiohttp without the internals the guard needs."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        check_internals(asyncio.get_running_loop())
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup, freezes it
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory, loop=plain._loop,
                             handler_cancellation=plain.handler_cancellation, guard=self.guard, **plain._kwargs)


class AcceptErrorLimiter:
    """Loop exception handler: 'socket.accept() out of system resource' once per interval.

    asyncio reports every failed accept with a traceback; with fds exhausted that is tens of
    thousands of lines a second. Anything else goes to the default handler.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last = -float("inf")
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return
        log.error("accept failed: %s (%d more in the last %.0f s)", context.get("exception"), self.suppressed,
                  self.interval_s, extra={"event": "accept_failed", "suppressed": self.suppressed})
        self.last, self.suppressed = now, 0
