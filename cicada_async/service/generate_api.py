"""Triton's generate extension: ``POST /v2/models/{m}[/versions/{v}]/generate`` (one JSON answer)
and ``generate_stream`` (server-sent events, one event per delta in the same shape).

Request: ``{"text_input": "...", "parameters": {"max_tokens": 32, "temperature": 0, ...}}``;
as in Triton, other top-level fields are parameters too (``parameters`` wins on a clash).
Answer: ``{"model_name", "model_version", "text_output"}``; errors ``{"error": "message"}`` with
V2's statuses, and in a stream that has begun an event ``data: {"error": "message"}`` (Triton's
streams have no ``[DONE]``). Unknown parameters are ignored, as a Triton model ignores the
parameters it does not read. The admission, prompt, context, load and metrics are the data
plane's (``DataPlane.generate``), as for the OpenAI routes and V2 infer.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cicada_async.service.generation import UP_TO_CONTEXT, Generation
from cicada_async.service.openai_wire import validation_error
from cicada_async.service.responses import json_response
from cicada_async.service.routes import path_model, plane
from cicada_async.service.sse import ClientGone, EventStream, aborting, first_delta, next_delta, read_json
from protocols.errors import BadRequest, CicadaError
from protocols.generation import MAX_LOGPROBS, GenerationDelta, SamplingParams

log = logging.getLogger("cicada.server")


class GenerateParameters(BaseModel):
    """The parameters this server reads (vLLM's and TensorRT-LLM's backends' names)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    ignore_eos: bool = False
    priority: int = Field(0, ge=0, lt=2**31)  # as V2 infer's parameters.priority
    exclude_input_in_output: bool = True  # the prompt is not repeated in text_output (vLLM's default: False)
    stream: bool | None = None  # the route decides; accepted for Triton clients that send it

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens or UP_TO_CONTEXT, temperature=self.temperature, top_p=self.top_p,
            top_k=max(0, self.top_k), seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs, ignore_eos=self.ignore_eos)


def parse(doc: object) -> tuple[str, GenerateParameters]:
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    text = doc.get("text_input")
    if not isinstance(text, str):
        raise BadRequest("text_input must be a string")
    extra = doc.get("parameters", {})
    if not isinstance(extra, dict):
        raise BadRequest("parameters must be a JSON object")
    merged = {k: v for k, v in doc.items() if k not in ("text_input", "parameters", "id")} | extra
    try:
        params = GenerateParameters.model_validate(merged)
    except ValidationError as e:
        message = validation_error(e)["error"]
        raise BadRequest(str(message["message"]) if isinstance(message, dict) else str(message)) from None
    return text, params


async def generate(request: web.Request) -> web.StreamResponse:
    return await _serve(request, stream=False)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await _serve(request, stream=True)


async def _serve(request: web.Request, *, stream: bool) -> web.StreamResponse:
    dp = plane(request)
    name, version = path_model(request)
    dp.admit(name, version)  # before the body: an unknown model or a draining server reads no byte
    text, params = parse(await read_json(request, name))
    gen = await dp.generate(name, text, params.sampling(), priority=params.priority, version=version)
    head = "" if params.exclude_input_in_output else text
    try:
        first = await first_delta(request, gen)
        if stream:
            return await _stream(request, gen, first, head)
        parts = [head]
        d: GenerationDelta | None = first
        while d is not None:
            parts.append(d.text)
            d = None if d.finish_reason else await next_delta(request, gen)
        return json_response(_answer(gen, "".join(parts)))
    except ClientGone:
        return web.Response(status=499)  # never sent: the client is gone
    finally:
        await gen.aclose()  # early (client gone, error): the engine frees the sequence now


def _answer(gen: Generation, text: str) -> dict[str, str]:
    return {"model_name": gen.model, "model_version": "1", "text_output": text}


async def _stream(request: web.Request, gen: Generation, first: GenerationDelta, head: str) -> web.StreamResponse:
    out = EventStream(request)
    await out.open()
    try:
        d: GenerationDelta | None = first
        while d is not None:
            text, head = head + d.text, ""
            if text or d.finish_reason is not None:
                await out.send(_answer(gen, text))
            d = None if d.finish_reason else await next_delta(request, gen)
    except ClientGone:
        return out.response  # prepared already: nothing more is written to a closed connection
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not aborting(request) or task is None:
            raise
        task.uncancel()  # the drain's deadline: an error event, not a silent cut
        await out.send({"error": "server shut down before the generation finished; retry"})
    except CicadaError as e:
        await out.send({"error": str(e) or type(e).__name__})
    except Exception:
        log.exception("generation stream failed on %s", request.path)
        await out.send({"error": "internal server error"})
    return await out.close()
