"""The V2 inference service: aiohttp routes over the repository and the scheduler.

``main(argv)`` is what ``cicada serve`` runs. Long-lived resources (engine, repository,
scheduler, maintenance loop) belong to one cleanup_ctx, so they are created before the socket
accepts and torn down after the last handler finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from cicada_async import auth
from cicada_async.config import MODEL_NAME_RE, Config, ModelConfig, load_config, scan_repository
from cicada_async.metrics import CONTENT_TYPE, Metrics
from cicada_async.repository import Repository
from cicada_async.scheduler import Scheduler
from protocols import v2
from protocols.errors import (
    BadRequest,
    CicadaError,
    ConfigError,
    DeadlineExceeded,
    ModelNotFound,
    Overloaded,
    ShuttingDown,
)

log = logging.getLogger("cicada.server")

SERVER_NAME = "cicada-async"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository", "schedule_policy", "statistics"]
# Decoding/encoding big bodies (numpy parsing of long JSON lists) would stall the loop.
OFFLOAD_BYTES = 256 * 1024

EngineFactory = Callable[[Config], AbstractAsyncContextManager[Any]]

CONFIG_KEY = web.AppKey("config", Config)
METRICS_KEY = web.AppKey("metrics", Metrics)
REPO_KEY = web.AppKey("repository", Repository)
SCHED_KEY = web.AppKey("scheduler", Scheduler)
STATE_KEY = web.AppKey("state", dict)
ENGINE_KEY = web.AppKey("engine", object)
BUDGET_KEY = web.AppKey("body_budget", "BodyBudget")
TOKENS_KEY = web.AppKey("tokens", auth.TokenSet)


class BodyBudget:
    """Bytes of infer bodies the server holds at once (reading, queued or running).

    Reservations are made before bytes are read, so a flood of large bodies is refused
    without being buffered. Loop-only state: no lock needed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def try_reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


# -- responses -----------------------------------------------------------------------------------
def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly "application/json": KServe's client compares the header for equality and
    # aiohttp's json_response would append "; charset=utf-8".
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers)


def error_response(exc: BaseException) -> web.Response:
    """Map the error hierarchy onto HTTP statuses (documented in docs/service.md)."""
    headers = None
    if isinstance(exc, BadRequest):
        status = 400
    elif isinstance(exc, ModelNotFound):
        status = 404
    elif isinstance(exc, (Overloaded, ShuttingDown)):
        status = 503
        retry = exc.retry_after_s if isinstance(exc, Overloaded) else 1.0
        headers = {"Retry-After": str(max(1, round(retry)))}
    elif isinstance(exc, DeadlineExceeded):
        status = 504
    elif isinstance(exc, web.HTTPException):
        status = exc.status
        # Keep the informative headers (Accept-Encoding on 415, Allow on 405), not the framing.
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        text = exc.text if exc.text and not exc.text.startswith(f"{status}:") else exc.reason
        return json_response({"error": text}, status, headers or None)
    elif isinstance(exc, CicadaError):  # storage, checkpoint, config of a model dir, forward
        status = 500
    else:
        status = 500
        return json_response({"error": "internal server error"}, 500)
    return json_response({"error": str(exc) or type(exc).__name__}, status, headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except (CicadaError, web.HTTPException) as e:
        if isinstance(e, web.HTTPException) and e.status < 400:
            raise
        return error_response(e)
    except Exception as e:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(e)


def model_name(request: web.Request) -> str:
    name = request.match_info["model"]
    # Names are only ever looked up, never turned into paths; the pattern keeps them printable.
    if not MODEL_NAME_RE.match(name):
        raise BadRequest(f"invalid model name {name!r}")
    version = request.match_info.get("version")
    if version not in (None, "", "1"):
        raise ModelNotFound(f"model {name!r} has no version {version!r} (only version 1)")
    return name


# -- health and metadata --------------------------------------------------------------------------
async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    # Ready as soon as requests can be accepted: a cold model is loaded by its first request,
    # which waits in the heap meanwhile (see docs/service.md, "Readiness policy").
    state = request.app[STATE_KEY]
    if state.get("draining"):
        return json_response({"error": "server is shutting down"}, 503)
    if not engine_healthy(request.app):
        return json_response({"error": "the engine's executor thread died; restarting it"}, 503)
    return json_response({"ready": True})


def engine_healthy(app: web.Application) -> bool:
    """False from the moment the executor thread is found dead until it has been replaced."""
    if app[STATE_KEY].get("restarting"):
        return False
    engine = app.get(ENGINE_KEY)
    return bool(getattr(engine, "healthy", True)) if engine is not None else True


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


async def list_models(request: web.Request) -> web.Response:
    return json_response({"models": sorted(request.app[REPO_KEY].models)})


def _io(request: web.Request, cfg: ModelConfig, instance: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs: list[dict[str, Any]] | None = [s.as_dict() for s in cfg.inputs] if cfg.inputs else None
    outputs: list[dict[str, Any]] | None = [s.as_dict() for s in cfg.outputs] if cfg.outputs else None
    if inputs is None or outputs is None:
        try:
            d_in, d_out = instance.io_spec()
        except CicadaError as e:
            log.warning("io_spec failed for %s: %s", cfg.name, e)
            d_in, d_out = [], []
        inputs = inputs if inputs is not None else list(d_in)
        outputs = outputs if outputs is not None else list(d_out)
    return inputs, outputs


async def model_metadata(request: web.Request) -> web.Response:
    entry = request.app[REPO_KEY].get(model_name(request))
    inputs, outputs = _io(request, entry.config, entry.instance)
    return json_response({"name": entry.name, "versions": ["1"], "platform": "pytorch",
                          "inputs": inputs, "outputs": outputs})


async def model_ready(request: web.Request) -> web.Response:
    entry = request.app[REPO_KEY].get(model_name(request))
    # A model counts as ready when a request sent now will be answered: unloaded models are
    # loaded on demand. Only a failed last load (or draining) reports 503.
    if request.app[STATE_KEY].get("draining"):
        return json_response({"error": "server is shutting down"}, 503)
    if entry.failed:
        return json_response({"error": f"model {entry.name!r} failed to load: {entry.instance.last_error}"}, 503)
    return json_response({"name": entry.name, "ready": True, "state": entry.state})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# -- repository extension ------------------------------------------------------------------------
async def repo_index(request: web.Request) -> web.Response:
    repo = request.app[REPO_KEY]
    if repo.config.model_repository is not None:
        await asyncio.to_thread(repo.rescan)  # directory listing: off the loop
    return json_response(repo.index())


async def repo_load(request: web.Request) -> web.Response:
    await request.app[REPO_KEY].load(model_name(request))
    return json_response({})


async def repo_unload(request: web.Request) -> web.Response:
    await request.app[REPO_KEY].unload(model_name(request))
    return json_response({})


# -- inference -----------------------------------------------------------------------------------
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
    # Chunked bodies have no Content-Length: count as they stream (client_max_size is only
    # enforced by read(), whose limit is app-wide).
    async for chunk in request.content.iter_chunked(1 << 16):
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


def _header_length(request: web.Request) -> int | None:
    raw = request.headers.get(v2.HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{v2.HEADER_LENGTH} must be an integer") from None


def check_inputs(cfg: ModelConfig, instance: Any, inputs: dict[str, Any]) -> None:
    """Refuse inputs that contradict the published metadata before they reach the engine.

    A bad first request would otherwise fail the cold start that every queued request shares.
    Names are checked only against metadata from the config (the engine's derived metadata
    lists the example inputs, not every optional keyword a forward accepts).
    """
    if cfg.inputs:
        specs = {s.name: s.as_dict() for s in cfg.inputs}
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise BadRequest(f"unknown input(s) {', '.join(map(repr, unknown))} (model inputs: {', '.join(specs)})")
    else:
        try:
            specs = {s["name"]: s for s in instance.io_spec()[0]}
        except CicadaError:
            return
    for name, t in inputs.items():
        spec = specs.get(name)
        if spec is None:
            continue
        datatype = v2.TORCH_TO_V2.get(t.dtype)
        if datatype != spec["datatype"]:
            raise BadRequest(f"input {name!r} must be {spec['datatype']}, got {datatype}")
        shape = list(spec["shape"])
        # Rank only: derived metadata may pin example sizes that the model does not require.
        if len(shape) != t.dim():
            raise BadRequest(f"input {name!r} has shape {list(t.shape)}, model expects {shape}")


def precheck(request: web.Request) -> None:
    """Everything decidable from the request line and headers, before any body byte is read."""
    app = request.app
    entry = app[REPO_KEY].get(model_name(request))
    if app[STATE_KEY].get("draining"):
        raise ShuttingDown("server is shutting down")
    if not engine_healthy(app):
        raise Overloaded("the engine is restarting; retry later", app[CONFIG_KEY].server.retry_after_s)
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Compressed tensors save little and a small gzip can expand a thousandfold: refused
        # outright rather than decompressed under a cap (docs/service.md, "Limits").
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed",
            headers={"Accept-Encoding": "identity"})
    limit = app[CONFIG_KEY].server.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length,
                                            text=f"request body exceeds {limit} bytes")
    if app[SCHED_KEY].hopeless(entry):
        app[METRICS_KEY].shed.inc(model=entry.name, reason="queue_full")
        raise Overloaded(f"queue for model {entry.name!r} is full; retry later", app[CONFIG_KEY].server.retry_after_s)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: answer the refusal instead of inviting a body we would drop.

    aiohttp runs this before middlewares (so auth is checked here too, lest an unauthenticated
    caller learn which models exist); a returned response is final.
    """
    denied = auth.refusal(request, request.app[CONFIG_KEY].server.auth, request.app[TOKENS_KEY])
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
    app = request.app
    m = app[METRICS_KEY]
    cfg = app[CONFIG_KEY].server
    t0 = time.monotonic()
    precheck(request)
    name = model_name(request)
    entry = app[REPO_KEY].get(name)
    budget = app[BUDGET_KEY]
    # Reserve what Content-Length announces before reading a byte; chunked bodies reserve as
    # they stream. Released when the answer is ready (the inputs are garbage by then).
    reserved = [request.content_length or 0]
    if not budget.try_reserve(reserved[0]):
        m.shed.inc(model=name, reason="body_budget")
        raise Overloaded("too many request bytes in flight; retry later", cfg.retry_after_s)
    ok = False
    try:
        try:
            async with asyncio.timeout(cfg.body_timeout_s):
                body = await read_body(request, cfg.max_request_bytes, budget, reserved)
        except TimeoutError:
            raise web.HTTPRequestTimeout(text=f"request body not received within {cfg.body_timeout_s} s") from None
        hl = _header_length(request)
        if len(body) > OFFLOAD_BYTES:
            req = await asyncio.to_thread(v2.decode_request, body, hl)
        else:
            req = v2.decode_request(body, hl)
        del body  # the tensors alias a private copy; let the raw body go before waiting
        check_inputs(entry.config, entry.instance, req.inputs)
        outputs, stats = await app[SCHED_KEY].submit(entry, req.inputs, priority=req.priority, timeout_s=req.timeout_s)
        nbytes = sum(t.numel() * t.element_size() for t in outputs.values())
        encode = lambda: v2.encode_response(name, outputs, request_id=req.id, requested=req.outputs,  # noqa: E731
                                            binary_default=req.binary_output)
        out, out_hl = await asyncio.to_thread(encode) if nbytes > OFFLOAD_BYTES else encode()
        ok = True
        m.exec_count.inc(model=name, version="1")
        m.count.inc(model=name, version="1")
        m.queue_us.inc(int(stats.queue_s * 1e6), model=name, version="1")
        m.compute_us.inc(int(stats.compute_s * 1e6), model=name, version="1")
    finally:
        budget.release(reserved[0])
        (m.success if ok else m.failure).inc(model=name, version="1")
        m.request_us.inc(int((time.monotonic() - t0) * 1e6), model=name, version="1")
    if out_hl is None:
        return web.Response(body=out, content_type="application/json")
    return web.Response(body=out, content_type="application/octet-stream",
                        headers={v2.HEADER_LENGTH: str(out_hl)})


# -- application ---------------------------------------------------------------------------------
async def watch_engine(app: web.Application, engine: Any, sched: Scheduler) -> None:
    """Maintenance tick: notice a dead executor thread and replace it.

    A dead executor is noticed on one tick and replaced on the next, so that readiness probes
    see 503 for at least one interval (the load balancer stops sending) while requests
    already queued are held, not failed; they run once the new thread is up.
    """
    if not hasattr(engine, "restart_executor"):
        return  # test engines without an executor
    interval = app[CONFIG_KEY].server.keep_alive_check_s
    state = app[STATE_KEY]
    while True:
        await asyncio.sleep(interval)
        if getattr(engine, "healthy", True):
            continue
        state["restarting"] = True
        sched.hold()
        log.error("executor thread is dead; restarting it", extra={"event": "executor_dead"})
        try:
            await asyncio.sleep(interval)
            await engine.restart_executor()
            state["executor_restarts"] += 1
            log.warning("executor restarted; loaded models were dropped",
                        extra={"event": "executor_restarted", "restarts": state["executor_restarts"]})
        except Exception:  # keep watching: the next tick tries again
            log.exception("executor restart failed")
        finally:
            state["restarting"] = False
            sched.release()


def default_engine_factory(config: Config) -> AbstractAsyncContextManager[Any]:
    from cicada_async.engine import Engine  # deferred: heavy imports only when serving

    return Engine(storage=config.storage)


def build_app(config: Config, *, engine_factory: EngineFactory = default_engine_factory,
              options: Callable[[ModelConfig], Any] | None = None) -> web.Application:
    """The aiohttp application; ``engine_factory`` and ``options`` let tests swap the engine."""
    # Auth runs first: an unauthenticated request touches no handler and no body byte.
    auth_mw = auth.middleware(config.server.auth)
    app = web.Application(middlewares=[auth_mw, errors_middleware])
    app[TOKENS_KEY] = auth_mw.tokens  # type: ignore[attr-defined]
    metrics_ = Metrics()
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics_
    app[STATE_KEY] = {"draining": False, "restarting": False, "executor_restarts": 0}
    app[BUDGET_KEY] = BodyBudget(config.server.max_body_bytes_in_flight)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with engine_factory(config) as engine:
            repo = Repository(engine, config, metrics_, options)
            sched = Scheduler(repo, max_queue_total=config.server.max_queue_total,
                              retry_after_s=config.server.retry_after_s,
                              on_shed=lambda model, reason: metrics_.shed.inc(model=model, reason=reason))
            app[REPO_KEY] = repo
            app[SCHED_KEY] = sched
            app[ENGINE_KEY] = engine

            def pending() -> None:
                for name, e in repo.models.items():
                    metrics_.pending.set(sched.queued(name) + e.busy, model=name, version="1")

            metrics_.add_collector(pending)
            sched.start()
            maintenance = asyncio.create_task(repo.maintain(), name="cicada-maintenance")
            watchdog = asyncio.create_task(watch_engine(app, engine, sched), name="cicada-watchdog")
            try:
                yield
            finally:
                for task in (maintenance, watchdog):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await sched.aclose()

    async def on_shutdown(app: web.Application) -> None:
        # The socket is closed already; admitted requests keep running until shutdown_timeout.
        app[STATE_KEY]["draining"] = True
        if SCHED_KEY in app:
            app[SCHED_KEY].begin_drain()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(on_shutdown)

    r = app.router
    infer_route = {"expect_handler": expect_continue}
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2/models", list_models)
    r.add_post("/v2/repository/index", repo_index)
    r.add_post("/v2/repository/models/{model}/load", repo_load)
    r.add_post("/v2/repository/models/{model}/unload", repo_unload)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/ready", model_ready)
        r.add_post(prefix + "/infer", infer, **infer_route)
    r.add_get("/metrics", metrics)
    return app


# -- logging -------------------------------------------------------------------------------------
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields become keys (cold-start breakdowns)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": round(record.created, 6), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _RECORD_ATTRS and not k.startswith("_"):
                doc[k] = v
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# -- CLI -----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cicada serve", description="Serve models over the V2 inference protocol.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="TOML config file")
    src.add_argument("--model-repository", type=Path, help="directory whose subfolders are model directories")
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default: config, then $PORT, then 8080)")
    p.add_argument("--memory-budget-bytes", type=int, help="resident weight budget; idle models evicted LRU")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: cores - 1; 0: torch default)")
    p.add_argument("--keep-alive-s", type=float, help="idle seconds before unload, for --model-repository models")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs latency)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    if args.config is not None:
        config = load_config(args.config)
    else:
        defaults = ModelConfig(name="_", uri="_")
        if args.keep_alive_s is not None:
            defaults.keep_alive_s = args.keep_alive_s or None
        config = Config(model_repository=args.model_repository)
        config.models = scan_repository(args.model_repository, defaults)
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    if args.torch_threads is not None:
        config.server.torch_threads = args.torch_threads
    if args.memory_budget_bytes is not None:
        config.server.memory_budget_bytes = args.memory_budget_bytes
    auth.merge_env(config.server.auth)
    if config.server.port is None:
        env = os.environ.get("PORT")
        try:
            config.server.port = int(env) if env else 8080
        except ValueError:
            raise ConfigError(f"$PORT must be an integer, got {env!r}") from None
    return config


def main(argv: list[str]) -> int:
    """``cicada serve``: run until SIGTERM/SIGINT, then drain and exit 0."""
    if argv and argv[0] == "serve":
        argv = argv[1:]
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"cicada serve: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    threads = config.server.torch_threads
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else 0
    if threads:
        import torch

        # Set before the engine's thread starts; the intra-op pool is process-wide.
        torch.set_num_threads(threads)
    log.info("starting", extra={"event": "start", "host": config.server.host, "port": config.server.port,
                                "models": sorted(config.models), "torch_threads": threads})
    web.run_app(
        build_app(config),
        host=config.server.host,
        port=config.server.port,
        shutdown_timeout=config.server.shutdown_timeout_s,
        backlog=config.server.max_connections,
        access_log=logging.getLogger("aiohttp.access") if args.access_log else None,
        print=None,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
