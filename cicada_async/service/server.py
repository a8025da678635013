"""The V2 inference service's process: the aiohttp application, its resources and ``main``.

``main(argv)`` is what ``cicada serve`` runs. Long-lived resources (engine, repository,
scheduler, maintenance loop) belong to one cleanup_ctx, so they are created before the socket
accepts and torn down after the last handler finished. Handlers live in ``routes`` and ``infer``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from aiohttp import web

from cicada_async.engine.prefetch import current as current_prefetch
from cicada_async.engine.procfs import threads_while_fetching
from cicada_async.service import auth
from cicada_async.service.appkeys import (
    BUDGET_KEY, CONFIG_KEY, ENGINE_KEY, GRPC_KEY, METRICS_KEY, REPO_KEY, SCHED_KEY, STATE_KEY, STATS_KEY, TOKENS_KEY,
    EngineFactory,
)
from cicada_async.service.config import Config, ModelConfig, load_config, scan_repository
from cicada_async.service.infer import BodyBudget, expect_continue, infer
from cicada_async.service.lifecycle import drain_middleware, serve
from cicada_async.service.logs import setup_logging
from cicada_async.service.metrics import Metrics
from cicada_async.service.repository import Repository
from cicada_async.service.responses import errors_middleware
from cicada_async.service.routes import (
    list_models, live, metrics, model_config, model_metadata, model_ready, ready, repo_index, repo_load, repo_unload,
    server_metadata, stats,
)
from cicada_async.service.scheduler import Scheduler
from cicada_async.service.stats import Stats
from protocols.errors import ConfigError

log = logging.getLogger("cicada.server")
GRPC_GRACE_S = 0.5  # gRPC calls still running at teardown get this long (as HTTP's shutdown_timeout)


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


async def start_grpc(app: web.Application) -> Any:
    """The gRPC listener, when ``[server] grpc_port`` is set (else None)."""
    if app[CONFIG_KEY].server.grpc_port is None:
        return None
    # Imported only when serving gRPC: the generated messages register the protobuf package
    # "inference" process-wide, which tritonclient.grpc and kserve also claim (tests and
    # tools importing this module must be able to import either of them).
    from cicada_async.service.grpc_server import GrpcServer

    server = GrpcServer(app)
    await server.start()
    app[GRPC_KEY] = server
    return server


def default_engine_factory(config: Config) -> AbstractAsyncContextManager[Any]:
    from cicada_async.engine.runtime import Engine  # deferred: heavy imports only when serving

    return Engine(storage=config.storage, node_cache=config.node_cache, plan_dir=config.cache.plan_dir,
                  shared=not config.server.serialize_loads, every_core_when_idle=config.server.torch_threads is None)


def executed(app: web.Application, model: str, size: int, ns: int, cold: bool) -> None:
    """One successful model execution (a batch of ``size`` requests; ``cold``: a cold start's
    forward): Triton's exec count, the batch-size histogram and the statistics extension."""
    m = app[METRICS_KEY]
    m.exec_count.inc(model=model, version="1")
    m.batch_size.observe(size, model=model, version="1")
    if cold:
        m.cold_batch.set(size, model=model)
    app[STATS_KEY].execution(model, size, ns)


def build_app(config: Config, *, engine_factory: EngineFactory = default_engine_factory,
              options: Callable[[ModelConfig], Any] | None = None) -> web.Application:
    """The aiohttp application; ``engine_factory`` and ``options`` let tests swap the engine."""
    # Auth runs first: an unauthenticated request touches no handler and no body byte.
    auth_mw = auth.middleware(config.server.auth)
    # The drain middleware is outermost: at the shutdown deadline it answers for any handler.
    app = web.Application(middlewares=[drain_middleware, auth_mw, errors_middleware])
    app[TOKENS_KEY] = auth_mw.tokens  # type: ignore[attr-defined]
    metrics_ = Metrics()
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics_
    app[STATE_KEY] = {"draining": False, "restarting": False, "executor_restarts": 0}
    app[BUDGET_KEY] = BodyBudget(config.server.max_body_bytes_in_flight)
    app[STATS_KEY] = Stats()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with engine_factory(config) as engine:
            repo = Repository(engine, config, metrics_, options)
            sched = Scheduler(repo, max_queue_total=config.server.max_queue_total,
                              retry_after_s=config.server.retry_after_s,
                              on_shed=lambda model, reason: metrics_.shed.inc(model=model, reason=reason),
                              on_batch=lambda model, size, ns, cold: executed(app, model, size, ns, cold))
            app[REPO_KEY] = repo
            app[SCHED_KEY] = sched
            app[ENGINE_KEY] = engine

            def pending() -> None:
                for name, e in repo.models.items():
                    metrics_.pending.set(sched.queued(name) + e.busy, model=name, version="1")

            metrics_.add_collector(pending)
            sched.start()
            grpc_server = None
            maintenance = asyncio.create_task(repo.maintain(), name="cicada-maintenance")
            watchdog = asyncio.create_task(watch_engine(app, engine, sched), name="cicada-watchdog")
            try:
                grpc_server = await start_grpc(app)  # a taken port fails the start, torn down below
                yield
            finally:
                if grpc_server is not None:
                    # By now the drain has answered or cancelled the calls in flight.
                    await grpc_server.stop(GRPC_GRACE_S)
                for task in (maintenance, watchdog):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await sched.aclose()

    async def on_shutdown(app: web.Application) -> None:
        # For runners other than lifecycle.serve (tests): serve() has set these already.
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


def _few_malloc_arenas() -> None:
    """The engine's worker threads take turns computing; glibc would give each its own malloc
    arena, whose freed activations no other thread reuses. Measured over three rounds of four
    models cold-started and served: RSS after unload 531 -> 617 MiB with per-thread arenas,
    553 -> 552 MiB with two."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


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
    _few_malloc_arenas()
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
