"""The serving process's life: listen behind the connection guard, then a bounded drain.

SIGTERM/SIGINT starts the drain (docs/service.md, "Shutdown"):

1. Readiness turns 503 and new infer requests are refused with 503 + Retry-After; the listener
   stays open so that a client, even on a new connection, hears "retry elsewhere" rather than
   a refused connect. Every response from then on carries ``Connection: close``.
2. Admitted requests run until they finish or until ``shutdown_timeout_s`` minus a margin;
   those still running then are answered JSON 503 (their handler is cancelled).
3. Loads in flight are cancelled (fetch tasks, the executor's gated work), the engine is torn
   down, and the process exits 0. A backstop timer exits 0 at ``shutdown_timeout_s`` + 0.9 s
   whatever is still blocking (a storage read that never returns, a long torch op): the
   executor is a daemon thread and every request has been answered by then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web

from cicada_async.service.config import Config
from cicada_async.service.dataplane import DataPlane
from cicada_async.service.connections import (
    AcceptErrorLimiter,
    ConnectionGuard,
    GuardedRunner,
)
from cicada_async.service.responses import json_response
from cicada_async.service.routes import DATAPLANE

log = logging.getLogger("cicada.server")
ANSWER_MARGIN_S = 0.5  # of shutdown_timeout_s, kept to answer and tear down after the deadline
BACKSTOP_S = 0.9  # past shutdown_timeout_s: the process is gone by then, whatever blocks it


@web.middleware
async def drain_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Tracks handlers in flight; at the drain deadline, a cancelled one answers JSON 503."""
    state = request.app[DATAPLANE].state
    task = asyncio.current_task()
    if task is not None:
        state.inflight.add(task)
    try:
        resp = await handler(request)
    except asyncio.CancelledError:
        if not state.aborting or task is None:
            raise
        task.uncancel()  # our cancellation, answered here: the connection lives on to send it
        resp = json_response({"error": "server shut down before the request finished; retry"}, 503,
                             {"Retry-After": "1"})
    finally:
        if task is not None:
            state.inflight.discard(task)
    if state.draining:
        resp.force_close()  # clients move to another replica instead of reusing this one
    return resp


def fit_fd_limit(config: Config) -> None:
    """Keep the connection caps below the fd limit, raising the soft limit when allowed."""
    cfg = config.server
    # asyncio accepts up to a backlog's worth of sockets per loop pass, and a refused one is
    # closed two passes later (connection_made, then connection_lost are callbacks): under a
    # flood about 3 backlogs are open beyond the caps (measured 2). 256 more for models, logs
    # and storage.
    burst = 3 * cfg.max_connections
    need = cfg.max_open_connections + cfg.health_reserved_connections + burst + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        cap = max(1, soft - cfg.health_reserved_connections - burst - 256)
        log.warning("fd limit %d is below the connection caps; max_open_connections lowered to %d", soft, cap,
                    extra={"event": "fd_limit", "max_open_connections": cap})
        cfg.max_open_connections = cap
        cfg.max_connections_per_peer = min(cfg.max_connections_per_peer, cap)


def _backstop(timeout_s: float) -> None:
    def leave() -> None:
        log.error("shutdown did not finish within its limit; exiting now", extra={"event": "shutdown_forced"})
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(0)

    timer = threading.Timer(timeout_s, leave)
    timer.daemon = True
    timer.start()


async def _answer_or_abort(app: web.Application, deadline: float) -> int:
    """Wait for handlers in flight until ``deadline``; cancel (503) those still running then."""
    loop = asyncio.get_running_loop()
    state = app[DATAPLANE].state
    while state.inflight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    late = [t for t in state.inflight if not t.done()]
    state.aborting = True
    for t in late:
        t.cancel()
    end = loop.time() + ANSWER_MARGIN_S / 2
    while state.inflight and loop.time() < end:
        await asyncio.sleep(0.01)
    return len(late)


async def stop_loads(dp: DataPlane) -> None:
    """At the drain deadline: the engine's loads in flight, and the cold starts still waiting
    for room in the memory budget (which the engine does not know of yet)."""
    await dp.cancel_loads()
    await dp.repository.cancel_waiting_loads()


async def serve(app: web.Application, config: Config, access_log: logging.Logger | None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain within ``shutdown_timeout_s``."""
    cfg = config.server
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLimiter(cfg.accept_error_log_interval_s))
    fit_fd_limit(config)
    runner = GuardedRunner(app, ConnectionGuard(cfg), access_log=access_log, keepalive_timeout=cfg.idle_timeout_s,
                           auto_decompress=False, shutdown_timeout=ANSWER_MARGIN_S)
    await runner.setup()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, cfg.host, cfg.port, backlog=cfg.max_connections).start()
    except BaseException:
        await runner.cleanup()  # e.g. the port is taken: fail the start, no drain
        raise
    log.info("listening", extra={"event": "listening", "host": cfg.host, "port": cfg.port})
    await stop.wait()
    started = loop.time()
    _backstop(cfg.shutdown_timeout_s + BACKSTOP_S)
    log.info("draining", extra={"event": "drain", "shutdown_timeout_s": cfg.shutdown_timeout_s})
    dp = app[DATAPLANE]
    dp.begin_drain()
    aborted = await _answer_or_abort(app, started + max(0.0, cfg.shutdown_timeout_s - ANSWER_MARGIN_S))
    await stop_loads(dp)
    await runner.cleanup()
    log.info("stopped", extra={"event": "stopped", "aborted": aborted, "drain_s": round(loop.time() - started, 3)})
