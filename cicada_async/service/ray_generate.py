"""Text generation in a Ray Serve model replica: the OpenAI completions and chat routes and
Triton's generate / generate_stream, over the replica's ``DataPlane`` as in ``cicada serve``.

``answer`` is what ``CicadaModels.stream`` yields to the ingress: first the head of the answer
(a ``Reply``: status, headers, and the whole body when it is not streamed), then for a stream
one ``data:`` event per chunk, in the shapes of ``openai_api`` and ``generate_api`` (the OpenAI
objects are built by the same ``openai_api`` code). Errors before the first token are statuses;
after it, an event (OpenAI's stream then ends with ``[DONE]``). The generation is closed in a
``finally``: when the client leaves, Ray cancels this generator and the engine frees the
sequence's KV cache at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

import orjson
from pydantic import ValidationError

from cicada_async.service.dataplane import DataPlane
from cicada_async.service.generate_api import parse
from cicada_async.service.generation import Generation
from cicada_async.service.openai_api import OpenAIAnswer  # openai_api's objects, not re-made
from cicada_async.service.openai_api import openai_error_response
from cicada_async.service.openai_wire import ChatRequest, Collected, CompletionRequest, UnsupportedField, validation_error
from cicada_async.service.ray_wire import (
    DONE, EVENT_STREAM, SSE_HEADERS, Forwarded, Reply, as_openai, error_reply, json_reply, openai_error,
)
from cicada_async.service.sse import MAX_BODY_BYTES
from protocols.errors import BadRequest, CicadaError, InferenceError
from protocols.generation import ChatMessage, GenerationDelta

log = logging.getLogger("cicada.ray")
Out = AsyncGenerator[Reply | bytes, None]


def event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _TooLarge(BadRequest):
    """Answered 413, as the body read of ``cicada serve``."""


def _body(dp: DataPlane, req: Forwarded) -> object:
    """The JSON body under ``cicada serve``'s generation body limit (413) and parse (400)."""
    limit = min(dp.config.server.max_request_bytes, MAX_BODY_BYTES)
    if len(req.body) > limit:
        raise _TooLarge(f"request body exceeds {limit} bytes")
    try:
        return orjson.loads(req.body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None


def _error(e: Exception, openai: bool) -> Reply:
    if isinstance(e, _TooLarge):
        reply = json_reply({"error": str(e)}, 413)
    elif openai and isinstance(e, CicadaError):
        r = openai_error_response(e)
        body = r.body if isinstance(r.body, bytes) else b"{}"
        return Reply(r.status, body, {k: v for k, v in r.headers.items()
                                      if k.lower() not in ("content-type", "content-length")})
    else:
        reply = error_reply(e)
    return as_openai(reply) if openai else reply


async def _first(gen: Generation) -> GenerationDelta:
    d = await anext(gen.deltas, None)
    if d is None:
        raise InferenceError("the model ended the sequence without a result")
    return d


async def _next(gen: Generation, d: GenerationDelta) -> GenerationDelta | None:
    return None if d.finish_reason else await anext(gen.deltas, None)


def answer(dp: DataPlane, req: Forwarded) -> Out:
    """The head and events of one generation request (see the module's docstring)."""
    return _openai(dp, req) if req.action in ("completions", "chat") else _triton(dp, req)


async def _openai(dp: DataPlane, req: Forwarded) -> Out:
    chat = req.action == "chat"
    r: CompletionRequest | ChatRequest
    try:
        doc = _body(dp, req)
        if not isinstance(doc, dict):
            yield json_reply(openai_error(400, "the body must be a JSON object"), 400)
            return
        prompt: str | list[ChatMessage]
        if chat:
            r = ChatRequest.model_validate(doc)
            prompt = r.chat()
            params = r.sampling(r.max_completion_tokens or r.max_tokens, r.logprob_count())
        else:
            r = CompletionRequest.model_validate(doc)
            prompt = r.text()
            params = r.sampling(r.max_tokens, r.logprobs)
        gen = await dp.generate(r.model, prompt, params, priority=r.priority)
    except ValidationError as e:
        yield json_reply(validation_error(e), 400)
        return
    except UnsupportedField as e:
        yield json_reply(openai_error(400, str(e), e.param), 400)
        return
    except CicadaError as e:
        yield _error(e, openai=True)
        return
    try:
        out = OpenAIAnswer(r, gen, chat)
        try:
            first = await _first(gen)
            if not r.stream:
                whole = Collected()
                d: GenerationDelta | None = first
                while d is not None:
                    whole.add(d)
                    d = await _next(gen, d)
                yield json_reply(out.whole(whole))
                return
        except CicadaError as e:
            yield _error(e, openai=True)
            return
        yield Reply(200, b"", dict(SSE_HEADERS), EVENT_STREAM)
        try:
            if chat:
                yield event(out.role_chunk())
            d = first
            while d is not None:
                chunk = out.chunk(d)
                if chunk is not None:
                    yield event(chunk)
                d = await _next(gen, d)
            if r.include_usage:
                yield event(out.usage_chunk())
        except CicadaError as e:
            yield event(openai_error(error_reply(e).status, str(e)))
        except Exception:
            log.exception("generation stream failed")
            yield event(openai_error(500, "internal server error"))
        yield DONE
    finally:
        await gen.aclose()  # early (client gone, error): the engine frees the sequence now


def _text(gen: Generation, text: str) -> dict[str, str]:
    return {"model_name": gen.model, "model_version": "1", "text_output": text}  # generate_api's answer


async def _triton(dp: DataPlane, req: Forwarded) -> Out:
    name = req.model or ""
    try:
        dp.admit(name, req.version)
        text, params = parse(_body(dp, req))
        gen = await dp.generate(name, text, params.sampling(), priority=params.priority, version=req.version)
    except Exception as e:  # noqa: BLE001 - every error is an answer, in the V2 shape
        yield _error(e, openai=False)
        return
    head = "" if params.exclude_input_in_output else text
    try:
        try:
            d: GenerationDelta | None = await _first(gen)
            if req.action == "generate":
                parts = [head]
                while d is not None:
                    parts.append(d.text)
                    d = await _next(gen, d)
                yield json_reply(_text(gen, "".join(parts)))
                return
        except Exception as e:  # noqa: BLE001
            yield _error(e, openai=False)
            return
        yield Reply(200, b"", dict(SSE_HEADERS), EVENT_STREAM)
        try:
            while d is not None:
                piece, head = head + d.text, ""
                if piece or d.finish_reason is not None:
                    yield event(_text(gen, piece))
                d = await _next(gen, d)
        except CicadaError as e:
            yield event({"error": str(e) or type(e).__name__})
        except Exception:
            log.exception("generation stream failed")
            yield event({"error": "internal server error"})
    finally:
        await gen.aclose()
