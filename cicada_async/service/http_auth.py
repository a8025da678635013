"""HTTP's side of authentication: the middleware and 401/403 answers (``auth.scope_of`` says which
scope a path needs, for this server and the Ray ingress alike).

Routes and scopes (the decision itself is ``DataPlane.authorize``, shared with gRPC):

* open: ``/v2/health/live``, ``/v2/health/ready`` (probes carry no secrets), and ``/metrics``
  unless ``protect_metrics`` (then any valid token of either scope);
* ``admin``: ``/v2/repository/...`` (index, load, unload);
* ``inference``: everything else (``/v2``, model metadata and readiness, infer), including
  unknown paths, so that an unauthenticated caller cannot tell which routes exist.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from cicada_async.service.auth import scope_of
from cicada_async.service.routes import plane

def refusal(request: web.Request) -> web.Response | None:
    """The 401/403 answer for ``request``, or None when it may proceed."""
    dp = plane(request)
    denied = dp.authorize(scope_of(request.path, dp.config.server.auth), request.headers.get("Authorization"))
    if denied is None:
        return None
    return web.Response(body=orjson.dumps({"error": denied.message}), status=denied.status,
                        content_type="application/json", headers={"WWW-Authenticate": denied.challenge})


@web.middleware
async def auth_middleware(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Enforce the configured tokens; runs before any body byte is read."""
    return refusal(request) or await handler(request)
