"""The V2 gRPC service (``inference.GRPCInferenceService``) on its own port, beside the HTTP one.

A ``grpc.aio`` server on the aiohttp application's event loop, started and stopped by the
application's cleanup_ctx when ``[server] grpc_port`` is set. It shares the HTTP server's
state (repository, scheduler, body budget, metrics, statistics, tokens) through the app, and
its infer path is ``infer_core``'s: only the protobuf codec (``protocols.v2_grpc``) differs.

Errors map onto gRPC status codes as the HTTP ones map onto statuses: BadRequest ->
INVALID_ARGUMENT, ModelNotFound -> NOT_FOUND, Overloaded and ShuttingDown -> UNAVAILABLE (with
``retry-after`` trailing metadata), DeadlineExceeded -> DEADLINE_EXCEEDED, a missing or unknown
token -> UNAUTHENTICATED, a token of the other scope -> PERMISSION_DENIED, anything else ->
INTERNAL. Messages are handled as bytes here (no deserializer in grpc's hands) so that an infer
message is charged to the body budget before it is parsed, and a large one is parsed and
serialized off the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio

from cicada_async.service import auth, describe, infer_core
from cicada_async.service.appkeys import (
    BUDGET_KEY, CONFIG_KEY, EXTENSIONS, METRICS_KEY, REPO_KEY, SERVER_NAME, SERVER_VERSION, STATE_KEY, TOKENS_KEY,
)
from cicada_async.service.routes import check_name, model_stats
from protocols import grpc_v2_pb2 as pb
from protocols import v2_grpc
from protocols.errors import (
    BadRequest, CicadaError, ConfigError, DeadlineExceeded, ModelNotFound, Overloaded, ShuttingDown,
)

log = logging.getLogger("cicada.grpc")
SERVICE = "inference.GRPCInferenceService"
OFFLOAD_BYTES = 256 * 1024  # as infer.OFFLOAD_BYTES: parsing or serializing more would stall the loop
# Over gRPC tensors travel as raw contents; the binary tensor extension is HTTP's.
GRPC_EXTENSIONS = [e for e in EXTENSIONS if e != "binary_tensor_data"]
_OPEN = frozenset({"ServerLive", "ServerReady"})  # probes carry no secrets, as on HTTP
_ADMIN = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})

Handler = Callable[[web.Application, bytes, aio.ServicerContext], Awaitable[bytes]]


class Abort(Exception):
    """A status to answer with, raised inside a handler."""

    def __init__(self, code: grpc.StatusCode, message: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.metadata = code, message, metadata


def status_of(exc: BaseException, retry_after_s: float) -> Abort:
    """The error hierarchy onto gRPC status codes (the HTTP mapping is responses.error_response)."""
    if isinstance(exc, Abort):
        return exc
    if isinstance(exc, BadRequest):
        return Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, ModelNotFound):
        return Abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, (Overloaded, ShuttingDown)):
        retry = exc.retry_after_s if isinstance(exc, Overloaded) else retry_after_s
        return Abort(grpc.StatusCode.UNAVAILABLE, str(exc), (("retry-after", str(max(1, round(retry)))),))
    if isinstance(exc, DeadlineExceeded):
        return Abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, CicadaError):  # storage, checkpoint, a model dir's config, the forward
        return Abort(grpc.StatusCode.INTERNAL, str(exc) or type(exc).__name__)
    return Abort(grpc.StatusCode.INTERNAL, "internal server error")


def _scope(method: str) -> auth.Scope | None:
    return None if method in _OPEN else "admin" if method in _ADMIN else "inference"


def _authorization(context: aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _parse(cls: Any, data: bytes) -> Any:
    try:
        return cls.FromString(data)
    except DecodeError:
        raise BadRequest(f"malformed {cls.DESCRIPTOR.name} message") from None


def _entry(app: web.Application, name: str, version: str) -> Any:
    return app[REPO_KEY].get(check_name(name, version))


# -- handlers: bytes in, bytes out -------------------------------------------------------------------
async def server_live(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    return pb.ServerLiveResponse(live=True).SerializeToString()


async def server_ready(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    ready = not app[STATE_KEY].get("draining") and infer_core.engine_healthy(app)
    return pb.ServerReadyResponse(ready=ready).SerializeToString()


async def model_ready(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.ModelReadyRequest, data)
    entry = _entry(app, req.name, req.version)
    # As on HTTP: ready unless draining or the last load failed (cold models load on demand).
    ready = not app[STATE_KEY].get("draining") and not entry.failed
    return pb.ModelReadyResponse(ready=ready).SerializeToString()


async def server_metadata(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                     extensions=GRPC_EXTENSIONS).SerializeToString()


async def model_metadata(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.ModelMetadataRequest, data)
    doc = describe.metadata(_entry(app, req.name, req.version))
    return json_format.ParseDict(doc, pb.ModelMetadataResponse()).SerializeToString()


async def model_config(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.ModelConfigRequest, data)
    doc = describe.triton_config(_entry(app, req.name, req.version))
    return pb.ModelConfigResponse(config=json_format.ParseDict(doc, pb.ModelConfig())).SerializeToString()


async def model_statistics(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.ModelStatisticsRequest, data)
    name = check_name(req.name, req.version) if req.name else None
    doc = {"model_stats": model_stats(app, name)}
    return json_format.ParseDict(doc, pb.ModelStatisticsResponse()).SerializeToString()


async def repository_index(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.RepositoryIndexRequest, data)
    repo = app[REPO_KEY]
    if repo.config.model_repository is not None:
        await asyncio.to_thread(repo.rescan)  # directory listing: off the loop
    models = [m for m in repo.index() if not req.ready or m["state"] == "READY"]
    return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models]
                                      ).SerializeToString()


async def repository_load(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.RepositoryModelLoadRequest, data)
    await app[REPO_KEY].load(check_name(req.model_name))
    return pb.RepositoryModelLoadResponse().SerializeToString()


async def repository_unload(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.RepositoryModelUnloadRequest, data)
    await app[REPO_KEY].unload(check_name(req.model_name))
    return pb.RepositoryModelUnloadResponse().SerializeToString()


async def model_infer(app: web.Application, data: bytes, context: aio.ServicerContext) -> bytes:
    """ModelInfer: the same admission, checks, scheduler and accounting as HTTP infer."""
    cfg = app[CONFIG_KEY].server
    budget = app[BUDGET_KEY]
    # grpc has already buffered the message (at most max_request_bytes): charge it to the body
    # budget until the answer is ready, so HTTP and gRPC bodies share one bound.
    n = len(data)
    if not budget.try_reserve(n):
        app[METRICS_KEY].shed.inc(model="", reason="body_budget")
        raise Overloaded("too many request bytes in flight; retry later", cfg.retry_after_s)
    try:
        big = n > OFFLOAD_BYTES
        msg = await asyncio.to_thread(_parse, pb.ModelInferRequest, data) if big else _parse(pb.ModelInferRequest, data)
        name = check_name(msg.model_name, msg.model_version)
        entry = infer_core.admit(app, name)
        infer_core.check_queue(app, entry)
        with infer_core.accounted(app, name) as outcome:
            t = time.monotonic_ns()
            req = await asyncio.to_thread(v2_grpc.decode_infer, msg) if big else v2_grpc.decode_infer(msg)
            outcome.decode_ns = time.monotonic_ns() - t
            del msg
            outputs = await infer_core.run(app, entry, req, outcome, deadline_s=context.time_remaining())
            t = time.monotonic_ns()
            nbytes = sum(o.numel() * o.element_size() for o in outputs.values())

            def encode() -> bytes:
                resp = v2_grpc.encode_infer(name, outputs, request_id=req.id, requested=req.outputs)
                return bytes(resp.SerializeToString())

            out = await asyncio.to_thread(encode) if nbytes > OFFLOAD_BYTES else encode()
            outcome.encode_ns = time.monotonic_ns() - t
        return out
    finally:
        budget.release(n)


HANDLERS: dict[str, Handler] = {
    "ServerLive": server_live, "ServerReady": server_ready, "ModelReady": model_ready,
    "ServerMetadata": server_metadata, "ModelMetadata": model_metadata, "ModelInfer": model_infer,
    "ModelConfig": model_config, "ModelStatistics": model_statistics, "RepositoryIndex": repository_index,
    "RepositoryModelLoad": repository_load, "RepositoryModelUnload": repository_unload,
}


def _wrap(app: web.Application, method: str, fn: Handler) -> grpc.RpcMethodHandler:
    """One RPC: auth, drain tracking, and the error mapping around ``fn``."""
    cfg = app[CONFIG_KEY].server
    need = _scope(method)

    async def handle(data: bytes, context: aio.ServicerContext) -> bytes:
        state = app[STATE_KEY]
        task = asyncio.current_task()
        # Tracked with the HTTP handlers: the SIGTERM drain waits for these too, and cancels
        # those still running at its deadline (answered UNAVAILABLE below).
        inflight: set[asyncio.Task[object]] = state.setdefault("inflight", set())
        if task is not None:
            inflight.add(task)
        try:
            denied = auth.check(cfg.auth, app[TOKENS_KEY], need, _authorization(context))
            if denied is not None:
                code = grpc.StatusCode.UNAUTHENTICATED if denied.status == 401 else grpc.StatusCode.PERMISSION_DENIED
                raise Abort(code, denied.message, (("www-authenticate", denied.challenge),))
            return await fn(app, data, context)
        except asyncio.CancelledError:
            if not state.get("aborting") or task is None:
                raise  # the client went away or its deadline passed: grpc answers for it
            task.uncancel()  # our cancellation at the drain deadline: answer it
            err = Abort(grpc.StatusCode.UNAVAILABLE, "server shut down before the request finished; retry",
                        (("retry-after", "1"),))
        except Exception as e:
            if not isinstance(e, (CicadaError, Abort)):
                log.exception("unhandled error in %s", method)
            err = status_of(e, cfg.retry_after_s)
        finally:
            inflight.discard(task)  # type: ignore[arg-type]
        await context.abort(err.code, err.message, trailing_metadata=err.metadata)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return grpc.unary_unary_rpc_method_handler(handle)


class GrpcServer:
    """The gRPC listener of one application; ``start`` and ``stop`` from its cleanup_ctx."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port: int | None = None
        self._server: aio.Server | None = None

    async def start(self) -> None:
        cfg = self.app[CONFIG_KEY].server
        options = [
            # The HTTP body limit; grpc refuses a larger message (RESOURCE_EXHAUSTED) before
            # any handler runs, and bounds a compressed one by its decompressed size.
            ("grpc.max_receive_message_length", cfg.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            # grpc defaults to SO_REUSEPORT: a second server on a taken port would share it
            # silently instead of failing to start.
            ("grpc.so_reuseport", 0),
            ("grpc.max_connection_idle_ms", int(cfg.idle_timeout_s * 1000)),
        ]
        handlers = {m: _wrap(self.app, m, fn) for m, fn in HANDLERS.items()}
        # Calls beyond the cap are refused by grpc with RESOURCE_EXHAUSTED, as connections
        # beyond max_open_connections are on HTTP.
        server = aio.server(options=options, maximum_concurrent_rpcs=cfg.max_open_connections)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        try:
            port = server.add_insecure_port(f"{host}:{cfg.grpc_port}")
        except RuntimeError as e:
            raise ConfigError(f"cannot listen for gRPC on {host}:{cfg.grpc_port}: {e}") from None
        if not port:
            raise ConfigError(f"cannot listen for gRPC on {host}:{cfg.grpc_port}")
        await server.start()
        self._server, self.port = server, port
        log.info("grpc listening", extra={"event": "grpc_listening", "host": cfg.host, "port": port})

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give those in flight ``grace_s``, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
