"""Optional bearer-token authentication with two scopes: inference and repository admin.

Routes and scopes:

* open: ``/v2/health/live``, ``/v2/health/ready`` (probes carry no secrets), and ``/metrics``
  unless ``protect_metrics`` (then any valid token of either scope);
* ``admin``: ``/v2/repository/...`` (index, load, unload);
* ``inference``: everything else (``/v2``, model metadata and readiness, infer), including
  unknown paths, so that an unauthenticated caller cannot tell which routes exist.

A missing or unknown token is 401 with ``WWW-Authenticate: Bearer``; a valid token of the
other scope is 403. Tokens are compared with ``hmac.compare_digest`` against EVERY configured
token (both lists, no early exit), so timing reveals neither a prefix nor which list matched.
Tokens never appear in logs, errors or reprs.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import orjson
from aiohttp import web

from cicada_async.service.config import AuthConfig

Scope = Literal["inference", "admin", "any"]

ENV_INFERENCE = "CICADA_INFERENCE_TOKENS"
ENV_ADMIN = "CICADA_ADMIN_TOKENS"
_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def merge_env(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> AuthConfig:
    """Add tokens from $CICADA_INFERENCE_TOKENS / $CICADA_ADMIN_TOKENS (comma lists).

    Read when the server starts (not at import), so tests and tools control the environment.
    """
    env = os.environ if environ is None else environ
    for var, attr in ((ENV_INFERENCE, "inference_tokens"), (ENV_ADMIN, "admin_tokens")):
        extra = [t.strip() for t in env.get(var, "").split(",") if t.strip()]
        current: list[str] = getattr(auth, attr)
        setattr(auth, attr, current + [t for t in extra if t not in current])
    return auth


def scope_of(path: str, auth: AuthConfig) -> Scope | None:
    """The scope a path needs; None when it is open."""
    if path in _OPEN_PATHS:
        return None
    if path == "/metrics":
        return "any" if auth.protect_metrics else None
    if path == "/v2/repository" or path.startswith("/v2/repository/"):
        return "admin"
    return "inference"


@dataclass(frozen=True)
class TokenSet:
    """Configured tokens as bytes, ready for constant-time comparison."""

    inference: tuple[bytes, ...]
    admin: tuple[bytes, ...]

    @classmethod
    def from_config(cls, auth: AuthConfig) -> "TokenSet":
        return cls(tuple(t.encode() for t in auth.inference_tokens), tuple(t.encode() for t in auth.admin_tokens))

    def __repr__(self) -> str:  # never print secrets
        return f"TokenSet(inference={len(self.inference)}, admin={len(self.admin)})"

    def scopes(self, token: bytes) -> set[str]:
        """Scopes ``token`` grants. Compares against every token of both lists, always."""
        inf = adm = False
        for t in self.inference:
            inf |= hmac.compare_digest(token, t)
        for t in self.admin:
            adm |= hmac.compare_digest(token, t)
        return {s for s, ok in (("inference", inf), ("admin", adm)) if ok}


def _bearer(header: str | None) -> bytes | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        return token.encode("ascii")
    except UnicodeEncodeError:
        return None  # tokens are ASCII; anything else cannot match


def _deny(status: int, message: str, challenge: str | None = None) -> web.Response:
    headers = {"WWW-Authenticate": challenge} if challenge else None
    return web.Response(body=orjson.dumps({"error": message}), status=status,
                        content_type="application/json", headers=headers)


@dataclass(frozen=True)
class Denial:
    """Why a request may not proceed: 401 (no or unknown token) or 403 (wrong scope)."""

    status: int
    message: str
    challenge: str


def check(auth: AuthConfig, tokens: TokenSet, need: Scope | None, header: str | None) -> Denial | None:
    """The refusal for a request needing ``need`` with this Authorization value, or None.

    Transport-agnostic: HTTP passes its header, gRPC its ``authorization`` metadata.
    """
    if not auth.enabled or need is None:
        return None
    token = _bearer(header)
    if token is None:
        return Denial(401, "missing bearer token", 'Bearer realm="cicada"')
    granted = tokens.scopes(token)
    if not granted:
        return Denial(401, "invalid bearer token", 'Bearer realm="cicada", error="invalid_token"')
    if need != "any" and need not in granted:
        return Denial(403, f"token does not grant the {need} scope",
                      f'Bearer realm="cicada", error="insufficient_scope", scope="{need}"')
    return None


def refusal(request: web.Request, auth: AuthConfig, tokens: TokenSet) -> web.Response | None:
    """The 401/403 answer for ``request``, or None when it may proceed."""
    denied = check(auth, tokens, scope_of(request.path, auth), request.headers.get("Authorization"))
    return None if denied is None else _deny(denied.status, denied.message, denied.challenge)


def middleware(auth: AuthConfig) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An aiohttp middleware enforcing ``auth``; runs before any body is read."""
    tokens = TokenSet.from_config(auth)

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        return refusal(request, auth, tokens) or await handler(request)

    check.tokens = tokens  # type: ignore[attr-defined]  # reused by the Expect handler
    return check
