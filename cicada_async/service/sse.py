"""HTTP's side of text generation, shared by the OpenAI and Triton generate routes: the JSON body
read under the same limits as an infer body, server-sent events out, and a client that hangs up.

Server-sent events (``text/event-stream``): each event is ``data: <json>\\n\\n``; the OpenAI
stream ends with the literal ``data: [DONE]\\n\\n``. Headers go out only once the first delta
is there, so that a refusal before any token (overload, a failed load) is still a status code;
an error after that is an event, never a silent cut.

aiohttp does not cancel a handler whose client went away (the application runs with
``handler_cancellation`` off, its default): a write to the closed transport fails, but a
sequence waiting for its first token (a cold start, a long prefill, the engine's waiting line)
writes nothing for seconds. ``next_delta`` therefore watches the transport while it waits and
closes the generation as soon as the client is gone, so the engine frees its KV cache at once.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import web

from cicada_async.service.generation import Generation
from cicada_async.service.infer import read_body
from cicada_async.service.routes import plane
from protocols.errors import BadRequest, InferenceError
from protocols.generation import GenerationDelta

# The largest generation request body: aiohttp's client_max_size default, which the server's
# other JSON routes keep too (a prompt of ~250k tokens; no context here is that long).
MAX_BODY_BYTES = 1 << 20
GONE_POLL_S = 0.05  # how often a waiting stream looks at its connection
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed the connection; its generation has been closed."""


async def read_json(request: web.Request, model: str = "") -> object:
    """The request's JSON body, read under the infer body's rules: no compression, the size
    limit (413), the shared body budget (503), the body timeout and the slow-body floor (408).
    ``model`` labels a refusal's metric (unknown before an OpenAI body is read)."""
    dp = plane(request)
    cfg = dp.config.server
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed",
            headers={"Accept-Encoding": "identity"})
    limit = min(cfg.max_request_bytes, MAX_BODY_BYTES)
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length,
                                            text=f"request body exceeds {limit} bytes")
    reserved = [request.content_length or 0]
    dp.reserve_body(model, reserved[0])
    try:
        try:
            async with asyncio.timeout(cfg.body_timeout_s):
                body = await read_body(request, limit, dp.budget, reserved)
        except TimeoutError:
            raise web.HTTPRequestTimeout(text=f"request body not received within {cfg.body_timeout_s} s") from None
    finally:
        dp.release_body(reserved[0])  # a prompt's bytes are small once parsed
    try:
        doc: object = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    return doc


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def next_delta(request: web.Request, gen: Generation) -> GenerationDelta | None:
    """The generation's next delta (None once it ended), or ``ClientGone`` after closing it
    when the client hung up meanwhile."""
    task = asyncio.ensure_future(anext(gen.deltas, None))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=GONE_POLL_S)
            if done:
                return task.result()
            if client_gone(request):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                await gen.aclose()
                raise ClientGone()
    except asyncio.CancelledError:  # the handler was cancelled (the drain's deadline)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise


async def first_delta(request: web.Request, gen: Generation) -> GenerationDelta:
    """The first delta, before any response byte: its errors are still statuses."""
    d = await next_delta(request, gen)
    if d is None:
        raise InferenceError("the model ended the sequence without a result")
    return d


class EventStream:
    """A ``text/event-stream`` response, written one ``data:`` event at a time."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies (nginx) must not hold events back
        })

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, event: object) -> None:
        await self.write(b"data: " + orjson.dumps(event) + b"\n\n")

    async def write(self, raw: bytes) -> None:
        try:
            await self.response.write(raw)
        except ConnectionError:  # aiohttp's ClientConnectionResetError: the client left
            raise ClientGone() from None

    async def close(self) -> web.StreamResponse:
        with contextlib.suppress(ConnectionError):
            await self.response.write_eof()
        return self.response


def aborting(request: web.Request) -> bool:
    """The drain's deadline cancelled this handler: a stream under way answers with an error
    event (its status was sent long ago) instead of the drain's JSON 503."""
    return plane(request).state.aborting
