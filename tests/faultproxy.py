"""A fault-injecting HTTP proxy for storage tests and benchmarks.

It sits between a backend and a real server (moto, an aiohttp static origin, nginx) and
spoils a chosen number of requests in one of the ways real networks and origins do.
It runs on the event loop of whoever starts it, so a test can flip faults between awaits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web
from yarl import URL

Mode = Literal[
    "drop",  # send part of the body, then close the connection
    "status",  # answer `status` (500, 503, 405...) without asking the origin
    "slowdown",  # answer 503 with S3's SlowDown XML error
    "short",  # send the body one byte short, with a Content-Length that agrees
    "ignore_range",  # strip Range/If-Range/If-Match: the origin answers 200 with the object
    "replace",  # call `on_request` (which replaces the object at the origin), then forward
    "stall",  # stop sending for `stall_s` (after headers, or before them)
    "wrong_range",  # shift the Content-Range of a 206 by one byte
    "redirect",  # answer 307 to the same URL with one more hop in the query
]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
_SLOWDOWN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId>"
    b"</Error>"
)
_PIECE = 64 * 1024


@dataclass
class Fault:
    """What to do to which requests; `times=-1` spoils every matching request."""

    mode: Mode
    times: int = 1
    after: int = 0  # let this many matching requests through untouched first
    methods: tuple[str, ...] = ("GET",)
    status: int = 503
    drop_after: int | None = None  # body bytes sent before a drop; default: half the body
    stall_s: float = 30.0
    stall_before_headers: bool = False
    on_request: Callable[[], Awaitable[None]] | None = None
    seen: int = field(default=0, init=False)
    applied: int = field(default=0, init=False)

    def take(self, method: str) -> bool:
        if method not in self.methods:
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times >= 0 and self.applied >= self.times):
            return False
        self.applied += 1
        return True


@dataclass
class Logged:
    method: str
    path: str
    headers: dict[str, str]
    fault: str | None
    status: int | None = None


class FaultProxy:
    """Forwards everything to ``upstream`` except what ``fault`` spoils; caps bandwidth."""

    def __init__(self, upstream: str, *, bandwidth_bps: float | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.bandwidth_bps = bandwidth_bps
        self.fault: Fault | None = None
        self.log: list[Logged] = []
        self._next_send = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a stalled handler ends when its client gives up, and cleanup
        # does not wait the whole stall.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
        )
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _throttle(self, n: int) -> None:
        if not self.bandwidth_bps:
            return
        # One token bucket for all connections: the cap is on the link, not per request.
        now = time.monotonic()
        self._next_send = max(now, self._next_send) + n / self.bandwidth_bps
        delay = self._next_send - now
        if delay > 0:
            await asyncio.sleep(delay)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._spoil_or_forward(request)
        finally:
            self.in_flight -= 1

    async def _spoil_or_forward(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault if self.fault is not None and self.fault.take(request.method) else None
        entry = Logged(request.method, request.path_qs, dict(request.headers), fault and fault.mode)
        self.log.append(entry)
        mode = fault.mode if fault else None
        if fault is not None and mode == "replace" and fault.on_request is not None:
            await fault.on_request()
        if fault is not None and mode == "status":
            entry.status = fault.status
            return web.Response(status=fault.status, text=f"faultproxy: {fault.status}\n")
        if mode == "slowdown":
            entry.status = 503
            return web.Response(status=503, body=_SLOWDOWN_XML, content_type="application/xml")
        if mode == "redirect":
            hops = int(request.query.get("hop", "0")) + 1
            entry.status = 307
            location = str(request.rel_url.update_query(hop=str(hops)))
            return web.Response(status=307, headers={"Location": location})
        if fault is not None and mode == "stall" and fault.stall_before_headers:
            await asyncio.sleep(fault.stall_s)

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        if mode == "ignore_range":
            for name in ("Range", "If-Range", "If-Match"):
                headers.pop(name, None)
        body = await request.read() if request.can_read_body else None
        target = URL(self.upstream + request.raw_path, encoded=True)
        assert self._session is not None
        async with self._session.request(
            request.method, target, headers=headers, data=body, allow_redirects=False
        ) as up:
            return await self._relay(request, up, fault, entry)

    async def _relay(
        self,
        request: web.Request,
        up: aiohttp.ClientResponse,
        fault: Fault | None,
        entry: Logged,
    ) -> web.StreamResponse:
        mode = fault.mode if fault else None
        entry.status = up.status
        headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP}
        length = up.content_length
        if mode == "short" and length:
            length -= 1
        if mode == "wrong_range" and up.status == 206 and "Content-Range" in headers:
            unit_range, _, total = headers["Content-Range"].partition("/")
            first, _, last = unit_range.removeprefix("bytes ").partition("-")
            headers["Content-Range"] = f"bytes {int(first) + 1}-{int(last) + 1}/{total}"
        resp = web.StreamResponse(status=up.status, headers=headers)
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        limit = length if length is not None else None
        drop_at = None
        if fault is not None and mode == "drop":
            drop_at = fault.drop_after if fault.drop_after is not None else (length or 0) // 2
        stalled = False
        sent = 0
        async for piece in up.content.iter_chunked(_PIECE):
            if limit is not None:
                piece = piece[: max(0, limit - sent)]
            if drop_at is not None and sent + len(piece) >= drop_at:
                await resp.write(piece[: drop_at - sent])
                assert request.transport is not None
                # close() flushes what was written, then sends FIN: the client sees a body that
                # stops early on a connection that is gone.
                request.transport.close()
                return resp
            await self._throttle(len(piece))
            await resp.write(piece)
            sent += len(piece)
            # Stall after the first piece: headers and some bytes arrived, then silence.
            if fault is not None and mode == "stall" and not stalled:
                stalled = True
                await asyncio.sleep(fault.stall_s)
        await resp.write_eof()
        return resp
