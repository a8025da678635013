"""The V2 gRPC service (``inference.GRPCInferenceService``) on its own port, beside the HTTP one.

A ``grpc.aio`` server on the data plane's event loop, started and stopped beside the HTTP
listener (the HTTP application's cleanup_ctx) when ``[server] grpc_port`` is set. It holds the
``DataPlane`` and nothing of HTTP (no aiohttp import: ``tests/service/test_dataplane.py``), so it
shares the repository, scheduler, body budget, metrics, statistics, tokens and serving state
with HTTP, and translates protobuf messages (``protocols.v2_grpc``) into data plane calls.

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
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio

from cicada_async.service import auth
from cicada_async.service.dataplane import EXTENSIONS, DataPlane
from cicada_async.service.limits import OFFLOAD_BYTES, offload_codec
from protocols import grpc_v2_pb2 as pb
from protocols import v2_grpc
from protocols.errors import (
    BadRequest, CicadaError, ConfigError, DeadlineExceeded, ModelNotFound, Overloaded, ShuttingDown,
)

log = logging.getLogger("cicada.grpc")
SERVICE = "inference.GRPCInferenceService"
# Over gRPC tensors travel as raw contents; the binary tensor extension is HTTP's.
GRPC_EXTENSIONS = [e for e in EXTENSIONS if e != "binary_tensor_data"]
_OPEN = frozenset({"ServerLive", "ServerReady"})  # probes carry no secrets, as on HTTP
_ADMIN = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})

Handler = Callable[[DataPlane, bytes, aio.ServicerContext], Awaitable[bytes]]
M = TypeVar("M")  # a generated protobuf message class (the generated module is untyped)


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


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return str(value)
    return None


def _denial(dp: DataPlane, method: str, metadata: Any) -> Abort | None:
    """The refusal of a call to ``method`` carrying ``metadata``, or None when it may proceed."""
    denied = dp.authorize(_scope(method), _authorization(metadata))
    if denied is None:
        return None
    code = grpc.StatusCode.UNAUTHENTICATED if denied.status == 401 else grpc.StatusCode.PERMISSION_DENIED
    return Abort(code, denied.message, (("www-authenticate", denied.challenge),))


class AuthGate(aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped
    """Refuses an unauthorized call from its metadata, before its message is read.

    grpc reads a unary call's whole message before the handler runs (up to
    max_receive_message_length), but runs interceptors first: a refused call gets a
    request-streaming handler that answers without ever asking for the message, so an
    unauthenticated client cannot make the server buffer anything (HTTP likewise refuses
    before the first body byte).
    """

    def __init__(self, dp: DataPlane) -> None:
        self.dp = dp

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        service, _, method = str(details.method).lstrip("/").rpartition("/")
        err = _denial(self.dp, method, details.invocation_metadata) if service == SERVICE else None
        if err is None:
            return await continuation(details)

        async def refuse(requests: Any, context: aio.ServicerContext) -> bytes:
            await context.abort(err.code, err.message, trailing_metadata=err.metadata)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        return grpc.stream_unary_rpc_method_handler(refuse)


def _parse(cls: type[M], data: bytes) -> M:
    # Any: the generated message classes have no stubs (grpcio-tools' output, no mypy plugin).
    generated: Any = cls
    try:
        msg: M = generated.FromString(data)
    except DecodeError:
        raise BadRequest(f"malformed {generated.DESCRIPTOR.name} message") from None
    return msg


def _bytes(msg: Any) -> bytes:
    """A generated message serialized (``Any``: the generated module is untyped)."""
    return bytes(msg.SerializeToString())


# -- handlers: bytes in, bytes out -------------------------------------------------------------------
async def server_live(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    return _bytes(pb.ServerLiveResponse(live=dp.live()))


async def server_ready(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    return _bytes(pb.ServerReadyResponse(ready=dp.readiness().ready))


async def model_ready(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.ModelReadyRequest, data)
    return _bytes(pb.ModelReadyResponse(ready=dp.model_readiness(req.name, req.version).ready))


async def server_metadata(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    m = dp.server_metadata()
    return _bytes(pb.ServerMetadataResponse(name=m.name, version=m.version, extensions=GRPC_EXTENSIONS))


async def model_metadata(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.ModelMetadataRequest, data)
    doc = dp.model_metadata(req.name, req.version)
    return _bytes(json_format.ParseDict(doc, pb.ModelMetadataResponse()))


async def model_config(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.ModelConfigRequest, data)
    doc = dp.model_config(req.name, req.version)
    return _bytes(pb.ModelConfigResponse(config=json_format.ParseDict(doc, pb.ModelConfig())))


async def model_statistics(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.ModelStatisticsRequest, data)
    doc = {"model_stats": dp.statistics(req.name or None, req.version)}
    return _bytes(json_format.ParseDict(doc, pb.ModelStatisticsResponse()))


async def repository_index(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.RepositoryIndexRequest, data)
    models = [m for m in await dp.repository_index() if not req.ready or m["state"] == "READY"]
    return _bytes(pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models]))


async def repository_load(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.RepositoryModelLoadRequest, data)
    await dp.load(req.model_name)
    return _bytes(pb.RepositoryModelLoadResponse())


async def repository_unload(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    req = _parse(pb.RepositoryModelUnloadRequest, data)
    await dp.unload(req.model_name)
    return _bytes(pb.RepositoryModelUnloadResponse())


async def model_infer(dp: DataPlane, data: bytes, context: aio.ServicerContext) -> bytes:
    """ModelInfer: the same admission, checks, scheduler and accounting as HTTP infer."""
    # grpc has already buffered the message (at most max_request_bytes): charge it to the body
    # budget until the answer is ready, so HTTP and gRPC bodies share one bound.
    n = len(data)
    dp.reserve_body("", n)
    try:
        big = n > OFFLOAD_BYTES
        msg = await offload_codec(lambda: _parse(pb.ModelInferRequest, data)) if big else _parse(pb.ModelInferRequest, data)
        entry = dp.admit(msg.model_name, msg.model_version)
        name = entry.name
        dp.check_queue(entry)
        with dp.accounted(name) as outcome:
            t = time.monotonic_ns()
            req = await offload_codec(lambda: v2_grpc.decode_infer(msg)) if big else v2_grpc.decode_infer(msg)
            outcome.decode_ns = time.monotonic_ns() - t
            del msg
            outputs = await dp.infer(entry, req, outcome, deadline_s=context.time_remaining())
            t = time.monotonic_ns()
            nbytes = sum(o.numel() * o.element_size() for o in outputs.values())

            def encode() -> bytes:
                return _bytes(v2_grpc.encode_infer(name, outputs, request_id=req.id, requested=req.outputs))

            out = await offload_codec(encode) if nbytes > OFFLOAD_BYTES else encode()
            outcome.encode_ns = time.monotonic_ns() - t
        return out
    finally:
        dp.release_body(n)


HANDLERS: dict[str, Handler] = {
    "ServerLive": server_live, "ServerReady": server_ready, "ModelReady": model_ready,
    "ServerMetadata": server_metadata, "ModelMetadata": model_metadata, "ModelInfer": model_infer,
    "ModelConfig": model_config, "ModelStatistics": model_statistics, "RepositoryIndex": repository_index,
    "RepositoryModelLoad": repository_load, "RepositoryModelUnload": repository_unload,
}


def _wrap(dp: DataPlane, method: str, fn: Handler) -> grpc.RpcMethodHandler:
    """One RPC: auth, drain tracking, and the error mapping around ``fn``."""
    cfg = dp.config.server

    async def handle(data: bytes, context: aio.ServicerContext) -> bytes:
        state = dp.state
        task = asyncio.current_task()
        # Tracked with the HTTP handlers: the SIGTERM drain waits for these too, and cancels
        # those still running at its deadline (answered UNAVAILABLE below).
        if task is not None:
            state.inflight.add(task)
        try:
            # AuthGate refused unauthorized calls before their message was read; checked again
            # here so that a handler can never run unchecked, whatever the interceptor chain.
            denied = _denial(dp, method, context.invocation_metadata())
            if denied is not None:
                raise denied
            return await fn(dp, data, context)
        except asyncio.CancelledError:
            if not state.aborting or task is None:
                raise  # the client went away or its deadline passed: grpc answers for it
            task.uncancel()  # our cancellation at the drain deadline: answer it
            err = Abort(grpc.StatusCode.UNAVAILABLE, "server shut down before the request finished; retry",
                        (("retry-after", "1"),))
        except Exception as e:
            if not isinstance(e, (CicadaError, Abort)):
                log.exception("unhandled error in %s", method)
            err = status_of(e, cfg.retry_after_s)
        finally:
            if task is not None:
                state.inflight.discard(task)
        await context.abort(err.code, err.message, trailing_metadata=err.metadata)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return grpc.unary_unary_rpc_method_handler(handle)


MIN_CONCURRENT_RPCS = 8


def max_concurrent_rpcs(body_budget: int, max_message: int) -> int:
    """Concurrent calls such that their buffered messages fit the body budget."""
    return max(MIN_CONCURRENT_RPCS, body_budget // max(1, max_message))


class GrpcServer:
    """The gRPC listener of one data plane; ``start`` and ``stop`` beside the HTTP listener."""

    def __init__(self, dp: DataPlane) -> None:
        self.dp = dp
        self.port: int | None = None
        self._server: aio.Server | None = None

    async def start(self) -> None:
        cfg = self.dp.config.server
        options = [
            # The HTTP body limit, kept as the receive limit: a model that takes a 64 MiB input
            # over HTTP takes it over gRPC too. What bounds memory is the product below:
            # grpc refuses a larger message (RESOURCE_EXHAUSTED) before any handler runs,
            # bounds a compressed one by its decompressed size, and buffers a message only
            # for an authorized call (AuthGate), at most ``max_concurrent_rpcs`` at a time.
            ("grpc.max_receive_message_length", cfg.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            # grpc defaults to SO_REUSEPORT: a second server on a taken port would share it
            # silently instead of failing to start.
            ("grpc.so_reuseport", 0),
            # No bandwidth-delay probing: it widens each connection's HTTP/2 window to
            # megabytes, which a client fills before its call is even looked at (40 refused
            # 8 MiB calls raised the peak RSS by 30-110 MiB with it, under 10 MiB without:
            # tests/service/test_grpc_flood.py). A call being read still gets a window for its
            # whole message, which grpc opens once the handler asks for it.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.max_connection_idle_ms", int(cfg.idle_timeout_s * 1000)),
        ]
        handlers = {m: _wrap(self.dp, m, fn) for m, fn in HANDLERS.items()}
        # Calls beyond the cap are refused by grpc with RESOURCE_EXHAUSTED. grpc buffers a
        # whole message before the body budget can see it, so the cap is what the budget
        # allows of full-size messages (at least a few, so that probes get through).
        cap = min(cfg.max_open_connections, max_concurrent_rpcs(cfg.max_body_bytes_in_flight, cfg.max_request_bytes))
        server = aio.server(options=options, interceptors=(AuthGate(self.dp),), maximum_concurrent_rpcs=cap)
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
