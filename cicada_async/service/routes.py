"""HTTP handlers of the V2 health, metadata, configuration, statistics, repository and metrics endpoints.

Each handler reads its path into a ``DataPlane`` call and writes the answer as JSON; the
decisions are the data plane's. The application holds the data plane under ``DATAPLANE``,
its one key.
"""

from __future__ import annotations

from aiohttp import web

from cicada_async.service.dataplane import DataPlane
from cicada_async.service.metrics import CONTENT_TYPE
from cicada_async.service.responses import json_response

DATAPLANE = web.AppKey("dataplane", DataPlane)


def plane(request: web.Request) -> DataPlane:
    return request.app[DATAPLANE]


def path_model(request: web.Request) -> tuple[str, str | None]:
    """The model name and version a path names (checked by the data plane)."""
    return request.match_info["model"], request.match_info.get("version")


async def live(request: web.Request) -> web.Response:
    return json_response({"live": plane(request).live()})


async def ready(request: web.Request) -> web.Response:
    r = plane(request).readiness()
    return json_response({"ready": True}) if r.ready else json_response({"error": r.reason}, 503)


async def server_metadata(request: web.Request) -> web.Response:
    m = plane(request).server_metadata()
    return json_response({"name": m.name, "version": m.version, "extensions": list(m.extensions)})


async def list_models(request: web.Request) -> web.Response:
    return json_response({"models": plane(request).model_names()})


async def model_metadata(request: web.Request) -> web.Response:
    return json_response(plane(request).model_metadata(*path_model(request)))


async def model_config(request: web.Request) -> web.Response:
    """Triton's model configuration extension: ``GET /v2/models/{m}[/versions/1]/config``."""
    return json_response(plane(request).model_config(*path_model(request)))


async def stats(request: web.Request) -> web.Response:
    """Triton's statistics extension: ``GET /v2/models[/{m}[/versions/1]]/stats``."""
    name, version = path_model(request) if "model" in request.match_info else (None, None)
    return json_response({"model_stats": plane(request).statistics(name, version)})


async def model_ready(request: web.Request) -> web.Response:
    r = plane(request).model_readiness(*path_model(request))
    if not r.ready:
        return json_response({"error": r.reason}, 503)
    return json_response({"name": r.name, "ready": True, "state": r.state})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=plane(request).render_metrics(), headers={"Content-Type": CONTENT_TYPE})


async def repo_index(request: web.Request) -> web.Response:
    return json_response(await plane(request).repository_index())


async def repo_load(request: web.Request) -> web.Response:
    await plane(request).load(request.match_info["model"])
    return json_response({})


async def repo_unload(request: web.Request) -> web.Response:
    await plane(request).unload(request.match_info["model"])
    return json_response({})
