"""Handlers of the V2 health, metadata, configuration, statistics, repository and metrics endpoints."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from cicada_async.service import describe
from cicada_async.service.appkeys import (
    EXTENSIONS, METRICS_KEY, REPO_KEY, SERVER_NAME, SERVER_VERSION, STATE_KEY, STATS_KEY,
)
from cicada_async.service.config import MODEL_NAME_RE
from cicada_async.service.infer_core import engine_healthy
from cicada_async.service.metrics import CONTENT_TYPE
from cicada_async.service.responses import json_response
from protocols.errors import BadRequest, ModelNotFound

log = logging.getLogger("cicada.server")


def check_name(name: str, version: str | None = None) -> str:
    """A model name from a request (HTTP path, gRPC message), checked; any version but 1 is 404."""
    # Names are only ever looked up, never turned into paths; the pattern keeps them printable.
    if not MODEL_NAME_RE.match(name):
        raise BadRequest(f"invalid model name {name!r}")
    if version not in (None, "", "1"):
        raise ModelNotFound(f"model {name!r} has no version {version!r} (only version 1)")
    return name


def model_name(request: web.Request) -> str:
    return check_name(request.match_info["model"], request.match_info.get("version"))


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


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


async def list_models(request: web.Request) -> web.Response:
    return json_response({"models": sorted(request.app[REPO_KEY].models)})


async def model_metadata(request: web.Request) -> web.Response:
    return json_response(describe.metadata(request.app[REPO_KEY].get(model_name(request))))


async def model_config(request: web.Request) -> web.Response:
    """Triton's model configuration extension: ``GET /v2/models/{m}[/versions/1]/config``."""
    return json_response(describe.triton_config(request.app[REPO_KEY].get(model_name(request))))


def model_stats(app: web.Application, name: str | None) -> list[dict[str, Any]]:
    """Statistics of one model, or of every model (zeros for those never asked)."""
    repo, stats = app[REPO_KEY], app[STATS_KEY]
    names = [repo.get(name).name] if name else sorted(repo.models)
    return [stats.of(n).as_dict() for n in names]


async def stats(request: web.Request) -> web.Response:
    """Triton's statistics extension: ``GET /v2/models[/{m}[/versions/1]]/stats``."""
    name = model_name(request) if "model" in request.match_info else None
    return json_response({"model_stats": model_stats(request.app, name)})


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
