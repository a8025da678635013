"""The Ray Serve front end's HTTP ingress: ``CicadaIngress`` takes every request from Ray's proxy.

Ray's ingress is ASGI and our HTTP front end is aiohttp, so it cannot be mounted. The ingress
answers what needs no model (health, server metadata, the model lists of V2 and OpenAI), checks
the bearer token by ``cicada serve``'s rule, and forwards the rest, body bytes untouched, to
``CicadaModels`` with the model's name as Ray's multiplexed model id: from the path for V2 and
Triton's generate, from the body's ``model`` for the OpenAI routes. Ray's router then prefers a
replica that holds the model. A name the repository does not have is refused here, so a typo
never wakes a replica from zero.

Generation is a streaming call (``handle.options(stream=True)``): the replica yields the head
of its answer (status, headers) and then the body's events, and a streamed answer goes out
through Ray's proxy as a ``StreamingResponse`` event by event. A replica lost mid-stream (its
node left) ends the stream with an error event (and ``[DONE]`` for OpenAI), never a silent cut
or a hang. No torch in this process: only ``ray_wire`` and the torch-free config and auth.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import orjson
from ray import serve
from ray.exceptions import RayError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from cicada_async.service.ray_wire import (
    DONE, EXTENSIONS, OPENAI_PREFIXES, SERVER_NAME, SERVER_VERSION, Action, CicadaArgs, Forwarded, Reply, as_openai,
    is_openai, json_reply, load_settings, log, openai_error, scope_of,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?"
                         r"(?:/(ready|config|stats|infer|generate|generate_stream))?$")
_REPO_PATH = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)$")
_POSTS = ("infer", "generate", "generate_stream")
_STREAMED: tuple[Action, ...] = ("completions", "chat", "generate", "generate_stream")
LOST = "the replica serving this request was lost ({}); retry"


def _lost(e: RayError, openai: bool) -> Reply:
    """The answer to a request whose replica died with it (its node left the cluster): now, never
    a hang; the next request goes to a replica Ray has rescheduled."""
    log.warning("replica lost during a request: %s", e)
    reply = json_reply({"error": LOST.format(type(e).__name__)}, 503, {"Retry-After": "1"})
    return as_openai(reply) if openai else reply


def _card(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": SERVER_NAME}  # openai_api's card


@serve.deployment()
class CicadaIngress:
    """Ray's HTTP proxy hands every request here; model requests go on to ``CicadaModels``."""

    def __init__(self, models: DeploymentHandle[object], args: CicadaArgs) -> None:
        from cicada_async.service.auth import TokenSet

        self._models = models
        self._args = args
        self._config = load_settings(args)
        self._tokens = TokenSet.from_config(self._config.server.auth)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = str(request.scope.get("root_path") or "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        openai = is_openai(path)
        denied = self._refusal(path, request.headers.get("authorization"))
        if denied is not None:
            return _response(as_openai(denied) if openai else denied)
        path = path.rstrip("/") or "/"
        answer = await (self._openai(request, path) if openai else self._answer(request, path))
        return answer if isinstance(answer, Response) else _response(as_openai(answer) if openai else answer)

    def _refusal(self, path: str, authorization: str | None) -> Reply | None:
        from cicada_async.service.auth import check

        auth = self._config.server.auth
        denied = check(auth, self._tokens, scope_of(path, auth), authorization)
        if denied is None:
            return None
        return json_reply({"error": denied.message}, denied.status, {"WWW-Authenticate": denied.challenge})

    async def _answer(self, request: Request, path: str) -> Reply | Response:
        method = request.method
        if path in ("/v2/health/live", "/v2/health/ready"):
            # Ready while Ray routes: a request for a model with no replica is held by Ray
            # until one has started (scale from zero), not refused.
            return json_reply({"live": True} if path.endswith("live") else {"ready": True})
        if path == "/v2":
            return json_reply({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})
        if path == "/v2/models":
            return json_reply({"models": sorted(await self._names())})
        if path == "/v2/models/stats":
            return await self._forward(Forwarded("stats", None, None))
        if path == "/metrics" and method == "GET":
            return await self._metrics(request.query_params.get("model"))
        if path == "/v2/repository/index" and method == "POST":
            return await self._forward(Forwarded("index", None, None))
        m = _REPO_PATH.match(path)
        if m and method == "POST":
            return await self._forward(Forwarded("unload" if m.group(2) == "unload" else "load", m.group(1), None))
        m = _MODEL_PATH.match(path)
        action = (m.group(3) or "metadata") if m else ""
        if m is None or (action in _POSTS) != (method == "POST"):
            return json_reply({"error": f"no route for {method} {path}"}, 404)
        name, version = m.group(1), m.group(2)
        if name not in await self._names():
            # Refused here: a mistyped name must not wake a replica from zero.
            return json_reply({"error": f"unknown model {name!r}"}, 404)
        body = await request.body() if action in _POSTS else b""
        if len(body) > self._config.server.max_request_bytes:
            return json_reply({"error": f"request body exceeds {self._config.server.max_request_bytes} bytes"}, 413)
        req = Forwarded(_ACTIONS[action], name, version, body, request.headers.get("inference-header-content-length"))
        return await (self._stream(req, openai=False) if req.action in _STREAMED else self._forward(req))

    async def _openai(self, request: Request, path: str) -> Reply | Response:
        """``/v1`` and ``/openai/v1``: the model lists here, completions and chat on a replica."""
        prefix = next(p for p in OPENAI_PREFIXES if path == p or path.startswith(p + "/"))
        sub, method = path[len(prefix):], request.method
        if sub == "/models" and method == "GET":
            return json_reply({"object": "list", "data": [_card(n) for n in sorted(await self._names())]})
        if sub.startswith("/models/") and sub.count("/") == 2 and method == "GET":
            name = sub[len("/models/"):]
            if name in await self._names():
                return json_reply(_card(name))
            return _unknown(name)
        action = _OPENAI_ACTIONS.get(sub)
        if action is None or method != "POST":
            return json_reply({"error": f"no route for {method} {path}"}, 404)
        body = await request.body()
        limit = self._config.server.max_request_bytes  # the replica applies the generation body limit
        if len(body) > limit:
            return json_reply({"error": f"request body exceeds {limit} bytes"}, 413)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return json_reply({"error": f"the body is not valid JSON: {e}"}, 400)
        if not isinstance(doc, dict):
            return json_reply(openai_error(400, "the body must be a JSON object"), 400)
        model = doc.get("model")
        if not isinstance(model, str):  # pydantic's words, as the replica's validation would say
            why = "Field required" if model is None else "Input should be a valid string"
            return json_reply(openai_error(400, f"model: {why}", "model"), 400)
        if model not in await self._names():
            return _unknown(model)
        return await self._stream(Forwarded(action, model, None, body), openai=True)

    async def _metrics(self, model: str | None) -> Reply:
        """``/metrics?model=NAME``: the Prometheus text of the replica that holds NAME (each replica
        has its own engine; Ray exports the cluster's own metrics). Like any request it wakes a
        replica from zero, so it needs a model and is meant for looking at one replica."""
        if not model:
            return json_reply({"error": "name a model: /metrics?model=NAME answers the metrics of the "
                                        "replica that holds it"}, 400)
        if model not in await self._names():
            return json_reply({"error": f"unknown model {model!r}"}, 404)
        return await self._forward(Forwarded("metrics", model, None))

    async def _names(self) -> set[str]:
        """The configured models, and the repository's folders as they are now (a rescan)."""
        names = set(self._config.models)
        repo = self._config.model_repository
        if repo is not None:
            from cicada_async.service.config import scan_repository

            names |= set(await asyncio.to_thread(scan_repository, repo))
        return names

    async def _forward(self, req: Forwarded) -> Reply:
        handle = self._models.options(multiplexed_model_id=req.model) if req.model else self._models
        try:
            reply: Reply = await handle.handle.remote(req)
        except RayError as e:
            return _lost(e, openai=False)
        return reply

    async def _stream(self, req: Forwarded, *, openai: bool) -> Reply | Response:
        """A generation: the replica's head, then its body, streamed through Ray's proxy when the
        head says so (the errors before the first token are still statuses)."""
        handle = self._models.options(multiplexed_model_id=req.model or "", stream=True)
        gen = cast("DeploymentResponseGenerator[Reply | bytes]", handle.stream.remote(req))
        try:
            head = await gen.__anext__()
            if not isinstance(head, Reply):
                raise TypeError(f"a replica's stream began with {type(head).__name__}, not its head")
            if not head.streamed:
                rest = [chunk async for chunk in gen if isinstance(chunk, bytes)]
                return Reply(head.status, head.body + b"".join(rest), head.headers, head.content_type)
        except RayError as e:
            return _lost(e, openai)
        except StopAsyncIteration:
            return json_reply({"error": "the replica ended the answer without a head"}, 500)
        return StreamingResponse(_relay(gen, openai), head.status, head.headers, media_type=head.content_type)


_OPENAI_ACTIONS: dict[str, Action] = {"/completions": "completions", "/chat/completions": "chat"}
_ACTIONS: dict[str, Action] = {"metadata": "metadata", "ready": "ready", "config": "config", "stats": "stats",
                               "infer": "infer", "generate": "generate", "generate_stream": "generate_stream"}


def _unknown(name: str) -> Reply:
    return json_reply(openai_error(404, f"unknown model {name!r}", None, "model_not_found"), 404)


def _response(reply: Reply) -> Response:
    return Response(reply.body, reply.status, reply.headers, media_type=reply.content_type)


async def _relay(gen: AsyncIterator[Reply | bytes], openai: bool) -> AsyncIterator[bytes]:
    """The replica's events as they come. Its loss mid-stream (the node left) is an error event,
    then ``[DONE]`` for OpenAI: the client learns it at once and never waits on a dead stream."""
    try:
        async for chunk in gen:
            if isinstance(chunk, bytes):
                yield chunk
    except RayError as e:
        log.warning("replica lost during a stream: %s", e)
        message = LOST.format(type(e).__name__)
        yield b"data: " + orjson.dumps(openai_error(503, message) if openai else {"error": message}) + b"\n\n"
        if openai:
            yield DONE
