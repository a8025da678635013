"""The V2 inference service's process: the data plane, its front ends (HTTP, gRPC) and ``main``.

``main(argv)`` is what ``cicada serve`` runs. ``build_app`` makes the one ``DataPlane`` and the
aiohttp application that holds it (its only key); the data plane's resources (engine,
repository, scheduler, maintenance and watchdog) and the gRPC listener belong to one
cleanup_ctx, so they are created before the socket accepts and torn down after the last handler
finished. HTTP handlers live in ``routes`` and ``infer``, gRPC's in ``grpc_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from cicada_async.engine.prefetch import current as current_prefetch
from cicada_async.engine.procfs import threads_while_fetching
from cicada_async.service import auth
from cicada_async.service.config import Config, ModelConfig, load_config, scan_repository
from cicada_async.service.dataplane import DataPlane, EngineFactory
from cicada_async.service.enginesetup import default_engine_factory, few_malloc_arenas
from cicada_async.service.generate_api import generate, generate_stream
from cicada_async.service.http_auth import auth_middleware
from cicada_async.service.infer import expect_continue, infer
from cicada_async.service.lifecycle import drain_middleware, serve
from cicada_async.service.logs import setup_logging
from cicada_async.service.openai_api import add_routes as add_openai_routes
from cicada_async.service.openai_api import openai_errors
from cicada_async.service.responses import errors_middleware
from cicada_async.service.routes import (
    DATAPLANE, list_models, live, metrics, model_config, model_metadata, model_ready, ready, repo_index, repo_load,
    repo_unload, server_metadata, stats,
)
from protocols.errors import ConfigError

if TYPE_CHECKING:
    from cicada_async.service.grpc_server import GrpcServer

log = logging.getLogger("cicada.server")
GRPC_GRACE_S = 0.5  # gRPC calls still running at teardown get this long (as HTTP's shutdown_timeout)


async def start_grpc(dp: DataPlane) -> GrpcServer | None:
    """The gRPC listener, when ``[server] grpc_port`` is set (else None)."""
    if dp.config.server.grpc_port is None:
        return None
    # Imported only when serving gRPC: the generated messages register the protobuf package
    # "inference" process-wide, which tritonclient.grpc and kserve also claim (tests and
    # tools importing this module must be able to import either of them).
    from cicada_async.service.grpc_server import GrpcServer

    server = GrpcServer(dp)
    await server.start()
    return server


def build_app(config: Config, *, engine_factory: EngineFactory = default_engine_factory) -> web.Application:
    """The aiohttp application over a new data plane; ``engine_factory`` lets tests swap the engine."""
    # Auth runs first: an unauthenticated request touches no handler and no body byte.
    # The drain middleware is outermost but one: at the shutdown deadline it answers for any
    # handler. Outside it, the OpenAI routes' answers of every layer get OpenAI's error shape.
    app = web.Application(middlewares=[openai_errors, drain_middleware, auth_middleware, errors_middleware])
    dp = app[DATAPLANE] = DataPlane(config, engine_factory)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with dp:
            grpc_server = await start_grpc(dp)  # a taken port fails the start, torn down by the data plane
            try:
                yield
            finally:
                if grpc_server is not None:
                    # By now the drain has answered or cancelled the calls in flight.
                    await grpc_server.stop(GRPC_GRACE_S)

    async def on_shutdown(app: web.Application) -> None:
        # For runners other than lifecycle.serve (tests): serve() has begun the drain already.
        dp.begin_drain()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(on_shutdown)

    r = app.router
    infer_route = {"expect_handler": expect_continue}
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2/models", list_models)
    # Before /v2/models/{model}: Triton's path for every model's statistics.
    r.add_get("/v2/models/stats", stats)
    r.add_post("/v2/repository/index", repo_index)
    r.add_post("/v2/repository/models/{model}/load", repo_load)
    r.add_post("/v2/repository/models/{model}/unload", repo_unload)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/ready", model_ready)
        r.add_get(prefix + "/config", model_config)
        r.add_get(prefix + "/stats", stats)
        r.add_post(prefix + "/infer", infer, **infer_route)
        r.add_post(prefix + "/generate", generate)  # Triton's generate extension
        r.add_post(prefix + "/generate_stream", generate_stream)
    add_openai_routes(r)  # /v1/... and /openai/v1/...
    r.add_get("/metrics", metrics)
    return app


# -- CLI -----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cicada serve", description="Serve models over the V2 inference protocol.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="TOML config file")
    src.add_argument("--model-repository", type=Path, help="directory whose subfolders are model directories")
    p.add_argument("--host", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default: config, then $PORT, then 8080)")
    p.add_argument("--grpc-port", type=int, help="also serve V2 over gRPC on this port (default: config, else off)")
    p.add_argument("--memory-budget-bytes", type=int, help="resident weight budget; idle models evicted LRU")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads for every forward (default: cores - 1 while a load fetches, every core otherwise; 0: torch default)")
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
    if args.grpc_port is not None:
        config.server.grpc_port = args.grpc_port
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
    setup_logging(args.log_level, secrets=config.server.auth.inference_tokens + config.server.auth.admin_tokens)
    few_malloc_arenas()
    threads = config.server.torch_threads
    if threads is None:
        threads = threads_while_fetching()
    if threads:
        import torch

        # Set before the engine's thread starts; the intra-op pool is process-wide.
        torch.set_num_threads(threads)
    prefetch = current_prefetch()
    log.info("starting", extra={"event": "start", "host": config.server.host, "port": config.server.port,
                                "models": sorted(config.models), "torch_threads": threads,
                                "prefetch": prefetch.summary() if prefetch is not None else None})
    access_log = logging.getLogger("aiohttp.access") if args.access_log else None
    asyncio.run(serve(build_app(config), config, access_log))
    # Everything is answered and torn down. The interpreter's own finalization with torch
    # loaded takes over a second more (measured 1.2 s), which would overrun the shutdown limit
    # (shutdown_timeout_s + 1 s): leave now, with the logs flushed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
