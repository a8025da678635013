"""Handlers of the V2 health, metadata, repository and metrics endpoints."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from cicada_async.service.appkeys import (
    ENGINE_KEY, EXTENSIONS, METRICS_KEY, REPO_KEY, SERVER_NAME, SERVER_VERSION, STATE_KEY,
)
from cicada_async.service.config import MODEL_NAME_RE, ModelConfig
from cicada_async.service.metrics import CONTENT_TYPE
from cicada_async.service.responses import json_response
from protocols.errors import BadRequest, CicadaError, ModelNotFound

log = logging.getLogger("cicada.server")


def model_name(request: web.Request) -> str:
    name = request.match_info["model"]
    # Names are only ever looked up, never turned into paths; the pattern keeps them printable.
    if not MODEL_NAME_RE.match(name):
        raise BadRequest(f"invalid model name {name!r}")
    version = request.match_info.get("version")
    if version not in (None, "", "1"):
        raise ModelNotFound(f"model {name!r} has no version {version!r} (only version 1)")
    return name


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
