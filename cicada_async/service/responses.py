"""JSON responses, and the mapping of the error hierarchy onto HTTP statuses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from protocols.errors import (
    BadRequest,
    CicadaError,
    DeadlineExceeded,
    ModelNotFound,
    Overloaded,
    ShuttingDown,
)

log = logging.getLogger("cicada.server")
# Refusals that leave the body unread, after which the connection is closed (Connection: close).
CLOSE_AFTER = frozenset({408, 413, 415})


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
        resp = error_response(e)
        if resp.status in CLOSE_AFTER and not request.content.is_eof():
            # The unread body is not drained (it may be compressed, huge or trickling): the
            # connection ends here, and the client must know it before reusing it.
            resp.force_close()
        return resp
    except Exception as e:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(e)
