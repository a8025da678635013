"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
streamed (server-sent events) and not, and the same under ``/openai/v1`` (KServe's prefix).

Each handler reads and validates its body (``openai_wire``), asks ``DataPlane.generate`` (the
admission, prompt, context, load and metrics are the data plane's, as for V2 infer) and writes
the deltas in OpenAI's shapes. Errors, wherever they arise (auth, limits, validation, the
engine), are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the status V2
would answer (503 + Retry-After for overload and drain); once a stream has begun, an error is
an event (``data: {"error": ...}``) followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from pydantic import ValidationError

from cicada_async.service.generation import BadParameter, Generation
from cicada_async.service.openai_wire import (
    ChatRequest, Collected, CompletionRequest, Json, UnsupportedField, chat_logprobs, completion_logprobs, error, usage,
    validation_error,
)
from cicada_async.service.responses import error_response, json_response
from cicada_async.service.routes import plane
from cicada_async.service.sse import DONE, ClientGone, EventStream, aborting, first_delta, next_delta, read_json
from protocols.errors import CicadaError, ModelNotFound
from protocols.generation import ChatMessage, GenerationDelta

log = logging.getLogger("cicada.server")
PREFIXES = ("/v1", "/openai/v1")
OWNER = "cicada-async"


def add_routes(router: web.UrlDispatcher) -> None:
    for prefix in PREFIXES:
        router.add_get(prefix + "/models", list_models)
        router.add_get(prefix + "/models/{model}", get_model)
        router.add_post(prefix + "/completions", completions)
        router.add_post(prefix + "/chat/completions", chat_completions)


def _is_openai(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PREFIXES)


def openai_error_response(exc: BaseException) -> web.Response:
    """V2's status and headers for ``exc`` (Retry-After on 503), in OpenAI's error shape."""
    base = error_response(exc)
    message = str(orjson.loads(base.body or b"{}").get("error", "")) if isinstance(base.body, bytes) else ""
    param = exc.param if isinstance(exc, BadParameter) else None
    code = "model_not_found" if isinstance(exc, ModelNotFound) else None
    headers = {k: v for k, v in base.headers.items() if k.lower() not in ("content-type", "content-length")}
    return json_response(error(base.status, message, param, code), base.status, headers or None)


@web.middleware
async def openai_errors(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Outermost on OpenAI paths: the other layers' ``{"error": "..."}`` answers (auth's 401 and
    403, the drain's 503, 404 and 405 of the router, 413/408/415 of the body read) are
    reshaped as OpenAI's error object, status and headers kept."""
    resp = await handler(request)
    if resp.status < 400 or not _is_openai(request.path) or not isinstance(resp, web.Response):
        return resp
    body = resp.body
    if resp.content_type != "application/json" or not isinstance(body, bytes):
        return resp
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return resp
    if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
        return resp  # already OpenAI's shape
    headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-type", "content-length")}
    new = json_response(error(resp.status, doc["error"]), resp.status, headers or None)
    if resp.keep_alive is False:
        new.force_close()
    return new


# -- models -----------------------------------------------------------------------------------------
def _card(name: str) -> Json:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


async def list_models(request: web.Request) -> web.Response:
    """Every model the server serves (a model that does not generate answers 400 when asked to)."""
    return json_response({"object": "list", "data": [_card(n) for n in plane(request).model_names()]})


async def get_model(request: web.Request) -> web.Response:
    try:
        entry = plane(request).model(request.match_info["model"])
    except CicadaError as e:
        return openai_error_response(e)
    return json_response(_card(entry.name))


# -- completions and chat --------------------------------------------------------------------------
async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _serve(request: web.Request, *, chat: bool) -> web.StreamResponse:
    dp = plane(request)
    doc = await read_json(request)
    if not isinstance(doc, dict):
        return json_response(error(400, "the body must be a JSON object"), 400)
    req: CompletionRequest | ChatRequest
    try:
        if chat:
            req = ChatRequest.model_validate(doc)
            prompt: str | list[ChatMessage] = req.chat()
            max_tokens = req.max_completion_tokens or req.max_tokens
            params = req.sampling(max_tokens, req.logprob_count())
        else:
            req = CompletionRequest.model_validate(doc)
            prompt = req.text()
            params = req.sampling(req.max_tokens, req.logprobs)
    except ValidationError as e:
        return json_response(validation_error(e), 400)
    except UnsupportedField as e:
        return json_response(error(400, str(e), e.param), 400)
    try:
        gen = await dp.generate(req.model, prompt, params, priority=req.priority)
    except CicadaError as e:
        return openai_error_response(e)
    answer = OpenAIAnswer(req, gen, chat)
    try:
        try:
            first = await first_delta(request, gen)
        except CicadaError as e:
            return openai_error_response(e)
        if req.stream:
            return await _stream(request, answer, first)
        whole = Collected()
        d: GenerationDelta | None = first
        while d is not None:
            whole.add(d)
            d = None if d.finish_reason else await next_delta(request, gen)
        return json_response(answer.whole(whole))
    except ClientGone:
        return web.Response(status=499)  # never sent: the client is gone; for the access log
    except CicadaError as e:  # an error after the first token, not streamed: still a status
        return openai_error_response(e)
    finally:
        await gen.aclose()  # early (client gone, error): the engine frees the sequence now


class OpenAIAnswer:
    """The OpenAI objects of one request: whole, or chunk by chunk."""

    def __init__(self, req: CompletionRequest | ChatRequest, gen: Generation, chat: bool) -> None:
        self.req, self.gen, self.chat = req, gen, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.logprobs = req.logprobs is not None and req.logprobs is not False
        self.offset = 0  # characters streamed so far (completions' text_offset)
        self.prompt_tokens = gen.prompt_tokens
        self.completion_tokens = 0

    def _envelope(self, obj: str, choices: list[Json], **extra: object) -> Json:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.gen.model,
                "choices": choices, **extra}

    def whole(self, c: Collected) -> Json:
        steps = tuple(c.steps)
        text = "".join(c.text)
        if self.chat:
            choice: Json = {"index": 0, "message": {"role": "assistant", "content": text},
                            "logprobs": chat_logprobs(steps) if self.logprobs else None, "finish_reason": c.finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": completion_logprobs(steps, 0) if self.logprobs else None,
                      "finish_reason": c.finish}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                              usage=usage(c.prompt_tokens, c.completion_tokens))

    def role_chunk(self) -> Json:
        choice: Json = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}
        return self._envelope("chat.completion.chunk", [choice], usage=None)

    def chunk(self, d: GenerationDelta) -> Json | None:
        """The chunk of one delta; None when it carries nothing to send (held-back bytes)."""
        self.prompt_tokens, self.completion_tokens = d.prompt_tokens, d.completion_tokens
        if not d.text and not d.logprobs and d.finish_reason is None:
            return None
        if self.chat:
            delta: Json = {"content": d.text} if d.text or d.finish_reason is None else {}
            choice: Json = {"index": 0, "delta": delta, "logprobs": chat_logprobs(d.logprobs) if self.logprobs else None,
                            "finish_reason": d.finish_reason}
        else:
            lp = completion_logprobs(d.logprobs, self.offset) if self.logprobs else None
            choice = {"index": 0, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
        self.offset += sum(len(s.chosen.token) for s in d.logprobs)
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice], usage=None)

    def usage_chunk(self) -> Json:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [],
                              usage=usage(self.prompt_tokens, self.completion_tokens))


async def _stream(request: web.Request, answer: OpenAIAnswer, first: GenerationDelta) -> web.StreamResponse:
    out = EventStream(request)
    await out.open()
    try:
        if answer.chat:
            await out.send(answer.role_chunk())
        d: GenerationDelta | None = first
        while d is not None:
            chunk = answer.chunk(d)
            if chunk is not None:
                await out.send(chunk)
            d = None if d.finish_reason else await next_delta(request, answer.gen)
        if answer.req.include_usage:
            await out.send(answer.usage_chunk())
    except ClientGone:
        return out.response  # prepared already: nothing more is written to a closed connection
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not aborting(request) or task is None:
            raise
        task.uncancel()  # the drain's deadline: the stream ends with an error event, not a cut
        await out.send(error(503, "server shut down before the generation finished; retry"))
    except CicadaError as e:
        await out.send(error(error_response(e).status, str(e)))
    except Exception:
        log.exception("generation stream failed on %s", request.path)
        await out.send(error(500, "internal server error"))
    await out.write(DONE)
    return await out.close()
