"""The HTTP infer endpoint: admission before the body, bounded body reads, the V2 JSON/binary codec.

The admission, checks, scheduler hand-off and accounting are the data plane's, shared with gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiohttp import web

from cicada_async.service.http_auth import refusal
from cicada_async.service.limits import OFFLOAD_BYTES, BodyBudget, offload_codec
from cicada_async.service.responses import error_response
from cicada_async.service.routes import path_model, plane
from protocols import v2
from protocols.errors import BadRequest, CicadaError, Overloaded


async def read_body(request: web.Request, limit: int, budget: BodyBudget | None = None,
                    reserved: list[int] | None = None) -> bytes:
    """The whole body, refusing more than ``limit`` bytes whether or not Content-Length is set.

    With ``budget``, bytes beyond what was reserved up front (from Content-Length) are reserved
    as they arrive and added to ``reserved[0]``; the caller releases them.
    """
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length,
                                            text=f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    cfg = plane(request).config.server
    # Chunked bodies have no Content-Length: count as they stream (client_max_size is only
    # enforced by read(), whose limit is app-wide).
    async for chunk in _paced(request, cfg.min_body_rate_bps, cfg.body_rate_grace_s):
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size,
                                                text=f"request body exceeds {limit} bytes")
        if budget is not None and reserved is not None and size > reserved[0]:
            grow = size - reserved[0]
            if not budget.try_reserve(grow):
                raise Overloaded("too many request bytes in flight; retry later")
            reserved[0] += grow
        chunks.append(chunk)
    return b"".join(chunks)


async def _paced(request: web.Request, rate_bps: float, grace_s: float) -> AsyncIterator[bytes]:
    """Body chunks, refusing a body slower than ``rate_bps`` on average after ``grace_s``.

    The deadline for the next byte moves with what has arrived (grace + bytes / rate), so a
    slowloris body trickling a byte a second is cut off, while a fast one never waits on it.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    got = 0
    while True:
        try:
            async with asyncio.timeout_at(start + grace_s + got / rate_bps if rate_bps > 0 else None):
                chunk = await request.content.readany()
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"request body arrived slower than {rate_bps:.0f} bytes/s (min_body_rate_bps)") from None
        if not chunk:
            return
        got += len(chunk)
        yield chunk


def _header_length(request: web.Request) -> int | None:
    raw = request.headers.get(v2.HEADER_LENGTH)
    if raw is None:
        return None
    # ASCII digits only: int() would also take "+157", " 157 ", "15_7" and non-ASCII digits.
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest(f"{v2.HEADER_LENGTH} must be an integer (ASCII digits)")
    return int(raw)


def precheck(request: web.Request) -> None:
    """Everything decidable from the request line and headers, before any body byte is read."""
    dp = plane(request)
    entry = dp.admit(*path_model(request))
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Compressed tensors save little and a small gzip can expand a thousandfold: refused
        # outright rather than decompressed under a cap (docs/service.md, "Limits").
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed",
            headers={"Accept-Encoding": "identity"})
    limit = dp.config.server.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length,
                                            text=f"request body exceeds {limit} bytes")
    dp.check_queue(entry)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: answer the refusal instead of inviting a body we would drop.

    aiohttp runs this before middlewares (so auth is checked here too, lest an unauthenticated
    caller learn which models exist); a returned response is final.
    """
    denied = refusal(request)
    if denied is not None:
        denied.force_close()
        return denied
    try:
        precheck(request)
    except (CicadaError, web.HTTPException) as e:
        if isinstance(e, web.HTTPException) and e.status < 400:
            raise
        resp = error_response(e)
        resp.force_close()  # the body the client holds back is never read
        return resp
    expect = request.headers.get("Expect", "")
    if request.version == (1, 1) and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's default handler: the body has not started
        return None
    raise web.HTTPExpectationFailed(text=f"unknown Expect: {expect}")


async def infer(request: web.Request) -> web.Response:
    dp = plane(request)
    cfg = dp.config.server
    precheck(request)
    entry = dp.model(*path_model(request))
    name = entry.name
    # Reserve what Content-Length announces before reading a byte; chunked bodies reserve as
    # they stream. Released when the answer is ready (the inputs are garbage by then).
    reserved = [request.content_length or 0]
    dp.reserve_body(name, reserved[0])
    try:
        with dp.accounted(name) as outcome:
            try:
                async with asyncio.timeout(cfg.body_timeout_s):
                    body = await read_body(request, cfg.max_request_bytes, dp.budget, reserved)
            except TimeoutError:
                raise web.HTTPRequestTimeout(text=f"request body not received within {cfg.body_timeout_s} s") from None
            hl = _header_length(request)
            t = time.monotonic_ns()
            if len(body) > OFFLOAD_BYTES:
                req = await offload_codec(lambda: v2.decode_request(body, hl))
            else:
                req = v2.decode_request(body, hl)
            outcome.decode_ns = time.monotonic_ns() - t
            del body  # the tensors alias a private copy; let the raw body go before waiting
            outputs = await dp.infer(entry, req, outcome)
            nbytes = sum(t.numel() * t.element_size() for t in outputs.values())

            def encode() -> tuple[bytes, int | None]:
                return v2.encode_response(name, outputs, request_id=req.id, requested=req.outputs,
                                          binary_default=req.binary_output)

            t = time.monotonic_ns()
            out, out_hl = await offload_codec(encode) if nbytes > OFFLOAD_BYTES else encode()
            outcome.encode_ns = time.monotonic_ns() - t
    finally:
        dp.release_body(reserved[0])
    if out_hl is None:
        return web.Response(body=out, content_type="application/json")
    return web.Response(body=out, content_type="application/octet-stream",
                        headers={v2.HEADER_LENGTH: str(out_hl)})
