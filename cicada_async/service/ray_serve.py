"""The Ray Serve front end: ``serve run cicada_async.service.ray_serve:build model_repository=DIR``.

Two deployments, both thin translations over what ``cicada serve`` already has:

- ``CicadaIngress`` takes every HTTP request from Ray's proxy (Ray's ingress is ASGI; our HTTP
  front end is aiohttp, so it cannot be mounted). It answers what needs no model (health,
  server metadata, the model list), checks the bearer token by the same rule as ``cicada
  serve``, and forwards the rest, bytes untouched, to ``CicadaModels`` with the path's model
  name as Ray's multiplexed model id: Ray's router then prefers a replica that holds the model.
- ``CicadaModels`` is one ``DataPlane`` per replica (the engine as in ``cicada serve``:
  pipelined cold starts, priorities, batching, the memory budget). Its ``@serve.multiplexed``
  loader only records that the replica serves the model; it does not load it. The first
  request's forward is the cold start (the pipelined one), and Ray's one-load-at-a-time lock
  around loaders (ray-project/ray#65346) never holds up a second model. Ray's LRU eviction
  unloads the model from the engine, so what Ray routes by and what the engine holds agree.

A decoded V2 request never crosses the hop: the ingress forwards the body bytes, the replica
decodes them with ``protocols.v2`` as the aiohttp front end does (docs/ray-serve.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import orjson
from pydantic import BaseModel, ConfigDict, model_validator
from ray import serve
from ray.exceptions import RayError
from ray.serve import Deployment
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from ray.serve import Application

    from cicada_async.service.config import Config
    from cicada_async.service.dataplane import DataPlane

log = logging.getLogger("cicada.ray")
REPLICA_HEADER = "cicada-replica"  # which replica answered: the multiplexing test reads it
NODE_HEADER = "cicada-node"


class CicadaArgs(BaseModel):
    """The builder's arguments (``serve run ... key=value`` or a Serve config's ``args``)."""

    model_config = ConfigDict(extra="forbid")
    model_repository: str | None = None
    config: str | None = None  # the cicada.toml of ``cicada serve --config``
    min_replicas: int = 0
    max_replicas: int = 2
    initial_replicas: int | None = None
    downscale_delay_s: float = 600.0  # Ray's default
    upscale_delay_s: float = 30.0  # Ray's default; from zero replicas Ray scales up at once
    target_ongoing_requests: float = 2.0
    # The engine batches and orders by priority what Ray lets through: more than one request
    # per replica must reach it for that to matter.
    max_ongoing_requests: int = 16
    max_models_per_replica: int = 3
    num_cpus: float = 1.0  # per model replica; torch gets as many threads (at least one)
    memory_bytes: int | None = None  # Ray's memory resource of a model replica
    num_gpus: float = 0.0
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.0
    # Other AutoscalingConfig fields (metrics_interval_s, look_back_period_s, ...): tests use
    # short ones; the defaults suit a real cluster.
    autoscaling: dict[str, float] = {}

    @model_validator(mode="after")
    def _one_source(self) -> CicadaArgs:
        if (self.model_repository is None) == (self.config is None):
            raise ValueError("give exactly one of model_repository and config")
        return self


def load_settings(args: CicadaArgs) -> Config:
    """The same Config that ``cicada serve --config F`` / ``--model-repository D`` reads."""
    from cicada_async.service import auth
    from cicada_async.service.config import Config, ModelConfig, load_config, scan_repository

    if args.config is not None:
        config = load_config(args.config)
    else:
        repo = Path(args.model_repository or "")
        config = Config(model_repository=repo)
        config.models = scan_repository(repo, ModelConfig(name="_", uri="_"))
    auth.merge_env(config.server.auth)
    return config


@dataclass
class Forwarded:
    """An HTTP request as the ingress forwards it: the route decided, the body untouched."""

    action: str  # infer | metadata | ready | config | stats | load | unload | index
    model: str | None
    version: str | None
    body: bytes = b""
    header_length: str | None = None


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps(obj), headers or {})


def error_reply(exc: BaseException) -> Reply:
    """The V2 error shape and status of ``responses.error_response`` (docs/service.md)."""
    from protocols.errors import BadRequest, CicadaError, DeadlineExceeded, ModelNotFound, Overloaded, ShuttingDown

    if isinstance(exc, (Overloaded, ShuttingDown)):
        retry = exc.retry_after_s if isinstance(exc, Overloaded) else 1.0
        return _json({"error": str(exc)}, 503, {"Retry-After": str(max(1, round(retry)))})
    status = (400 if isinstance(exc, BadRequest) else 404 if isinstance(exc, ModelNotFound)
              else 504 if isinstance(exc, DeadlineExceeded) else 500)
    if status == 500 and not isinstance(exc, CicadaError):
        log.error("unhandled error in a replica", exc_info=exc)
        return _json({"error": "internal server error"}, 500)
    return _json({"error": str(exc) or type(exc).__name__}, status)


class _Held:
    """What the multiplexed loader returns: this replica serves ``name``. Ray calls
    ``__del__`` (in a thread) when its LRU drops the model; the engine unloads it then."""

    def __init__(self, dp: DataPlane, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.dp, self.name, self.loop, self.live = dp, name, loop, True

    def __del__(self) -> None:
        if not self.live:  # Ray called it already; this is the garbage collector
            return
        self.live = False
        try:
            asyncio.run_coroutine_threadsafe(self.dp.unload(self.name), self.loop)
        except RuntimeError:  # the loop is closed: the replica is going away anyway
            pass


@serve.deployment()
class CicadaModels:
    """One data plane per replica, serving every model of the repository (multiplexed)."""

    async def __init__(self, args: CicadaArgs) -> None:  # type: ignore[misc]  # Ray awaits it
        # First, before torch is imported: the configured prefetch reads weights into the page
        # cache while the imports below run (engine/prefetch.py, as `cicada serve` does).
        from cicada_async.engine import prefetch

        prefetch.start_for_cli(["serve", "--config", args.config] if args.config
                               else ["serve", "--model-repository", args.model_repository or ""])
        from cicada_async.service.dataplane import DataPlane
        from cicada_async.service.server import _few_malloc_arenas, default_engine_factory

        config = load_settings(args)
        if config.server.torch_threads is None:
            # Ray gives the replica num_cpus of the node: torch gets that many threads, not
            # every core of a node it shares with other replicas.
            config.server.torch_threads = max(1, int(args.num_cpus))
        _few_malloc_arenas()
        import torch

        torch.set_num_threads(config.server.torch_threads or torch.get_num_threads())
        self._stack = AsyncExitStack()
        self._dp = await self._stack.enter_async_context(DataPlane(config, default_engine_factory))
        loop = asyncio.get_running_loop()

        async def hold(model_id: str) -> _Held:
            self._dp.model(model_id)  # unknown names are refused, never held
            return _Held(self._dp, model_id, loop)

        self._hold = serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)(hold)
        ctx = serve.get_replica_context()
        import ray

        self._ident = {REPLICA_HEADER: ctx.replica_id.unique_id, NODE_HEADER: ray.get_runtime_context().get_node_id()}

    async def handle(self, req: Forwarded) -> Reply:
        try:
            model = serve.get_multiplexed_model_id()
            if model:
                await self._hold(model)
            reply = await self._route(req)
        except Exception as e:  # noqa: BLE001 - every error is an answer, in the V2 shape
            reply = error_reply(e)
        reply.headers.update(self._ident)
        return reply

    async def _route(self, req: Forwarded) -> Reply:
        dp, name, version = self._dp, req.model or "", req.version
        if req.action == "infer":
            return await _infer(dp, name, version, req)
        if req.action == "metadata":
            return _json(dp.model_metadata(name, version))
        if req.action == "config":
            return _json(dp.model_config(name, version))
        if req.action == "stats":
            return _json({"model_stats": dp.statistics(req.model, version)})
        if req.action == "ready":
            r = dp.model_readiness(name, version)
            return _json({"name": r.name, "ready": True, "state": r.state}) if r.ready else _json({"error": r.reason}, 503)
        if req.action == "load":
            await dp.load(name)
            return _json({})
        if req.action == "unload":
            await dp.unload(name)
            return _json({})
        if req.action == "index":
            return _json(await dp.repository_index())
        return _json({"error": f"unknown action {req.action!r}"}, 404)

    async def __del__(self) -> None:
        """Ray's replica shutdown: drain, then tear the engine down."""
        self._dp.begin_drain()
        await self._stack.aclose()


async def _infer(dp: DataPlane, name: str, version: str | None, req: Forwarded) -> Reply:
    """``infer.infer`` without the socket: Ray's proxy has read the body already."""
    from cicada_async.service.limits import OFFLOAD_BYTES, offload_codec
    from protocols import v2
    from protocols.errors import BadRequest

    entry = dp.admit(name, version)
    limit = dp.config.server.max_request_bytes
    if len(req.body) > limit:
        return _json({"error": f"request body exceeds {limit} bytes"}, 413)
    dp.check_queue(entry)
    hl_raw = req.header_length
    if hl_raw is not None and not (hl_raw.isascii() and hl_raw.isdigit()):
        raise BadRequest(f"{v2.HEADER_LENGTH} must be an integer (ASCII digits)")
    hl = int(hl_raw) if hl_raw is not None else None
    body = req.body
    req.body = b""
    dp.reserve_body(entry.name, len(body))
    try:
        with dp.accounted(entry.name) as outcome:
            t = time.monotonic_ns()
            decoded = (await offload_codec(lambda: v2.decode_request(body, hl)) if len(body) > OFFLOAD_BYTES
                       else v2.decode_request(body, hl))
            outcome.decode_ns = time.monotonic_ns() - t
            outputs = await dp.infer(entry, decoded, outcome)

            def encode() -> tuple[bytes, int | None]:
                return v2.encode_response(entry.name, outputs, request_id=decoded.id, requested=decoded.outputs,
                                          binary_default=decoded.binary_output)

            t = time.monotonic_ns()
            nbytes = sum(o.numel() * o.element_size() for o in outputs.values())
            out, out_hl = await offload_codec(encode) if nbytes > OFFLOAD_BYTES else encode()
            outcome.encode_ns = time.monotonic_ns() - t
    finally:
        dp.release_body(len(body))
    if out_hl is None:
        return Reply(200, out)
    return Reply(200, out, {v2.HEADER_LENGTH: str(out_hl)}, "application/octet-stream")


_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|config|stats|infer))?$")
_REPO_PATH = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)$")


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
        denied = self._refusal(path, request.headers.get("authorization"))
        if denied is not None:
            return denied
        reply = await self._answer(request, path.rstrip("/") or "/")
        return Response(reply.body, reply.status, reply.headers, media_type=reply.content_type)

    def _refusal(self, path: str, authorization: str | None) -> Response | None:
        from cicada_async.service.auth import check
        from cicada_async.service.http_auth import scope_of

        auth = self._config.server.auth
        denied = check(auth, self._tokens, scope_of(path, auth), authorization)
        if denied is None:
            return None
        return Response(orjson.dumps({"error": denied.message}), denied.status,
                        {"WWW-Authenticate": denied.challenge}, media_type="application/json")

    async def _answer(self, request: Request, path: str) -> Reply:
        from cicada_async.service.dataplane import EXTENSIONS, SERVER_NAME, SERVER_VERSION

        method = request.method
        if path in ("/v2/health/live", "/v2/health/ready"):
            # Ready while Ray routes: a request for a model with no replica is held by Ray
            # until one has started (scale from zero), not refused.
            return _json({"live": True} if path.endswith("live") else {"ready": True})
        if path == "/v2":
            return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})
        if path == "/v2/models":
            return _json({"models": sorted(await self._names())})
        if path == "/v2/models/stats":
            return await self._forward(Forwarded("stats", None, None))
        if path == "/v2/repository/index" and method == "POST":
            return await self._forward(Forwarded("index", None, None))
        m = _REPO_PATH.match(path)
        if m and method == "POST":
            return await self._forward(Forwarded(m.group(2), m.group(1), None))
        m = _MODEL_PATH.match(path)
        if m is None or (m.group(3) == "infer") != (method == "POST"):
            return _json({"error": f"no route for {method} {path}"}, 404)
        name, version, action = m.group(1), m.group(2), m.group(3) or "metadata"
        if name not in await self._names():
            # Refused here: a mistyped name must not wake a replica from zero.
            return _json({"error": f"unknown model {name!r}"}, 404)
        body = await request.body() if action == "infer" else b""
        return await self._forward(Forwarded(action, name, version, body,
                                             request.headers.get("inference-header-content-length")))

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
            # The replica died with the request (its node left the cluster): an answer now,
            # never a hang; the next request goes to a replica Ray has rescheduled.
            log.warning("replica lost during a request: %s", e)
            return _json({"error": f"the replica serving this request was lost ({type(e).__name__}); retry"},
                         503, {"Retry-After": "1"})
        return reply


def build(args: dict[str, object]) -> Application:
    """The application builder: ``serve run cicada_async.service.ray_serve:build model_repository=DIR``.

    ``args`` arrive as strings from the CLI, typed from a Serve config YAML; both are validated
    by ``CicadaArgs``. The configuration is read once here, so a bad one fails the deploy.
    """
    a = CicadaArgs.model_validate(args)
    load_settings(a)  # fail at `serve run`, not in every replica
    autoscaling: dict[str, object] = {
        "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
        "initial_replicas": a.initial_replicas, "target_ongoing_requests": a.target_ongoing_requests,
        "downscale_delay_s": a.downscale_delay_s, "upscale_delay_s": a.upscale_delay_s, **a.autoscaling,
    }
    actor: dict[str, object] = {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus}
    if a.memory_bytes is not None:
        actor["memory"] = a.memory_bytes
    # mypy sees the classes; @serve.deployment made them Deployments.
    models = cast(Deployment, CicadaModels).options(autoscaling_config=autoscaling, ray_actor_options=actor,
                                  max_ongoing_requests=a.max_ongoing_requests).bind(a)
    ingress = cast(Deployment, CicadaIngress).options(num_replicas=a.ingress_replicas, max_ongoing_requests=1024,
                                    ray_actor_options={"num_cpus": a.ingress_num_cpus})
    app: Application = ingress.bind(models, a)
    return app
