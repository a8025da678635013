"""Optional bearer-token authentication with two scopes: inference and repository admin.

The decision, for any transport: may a caller presenting this Authorization value use a route of
scope X (``check``, asked through ``DataPlane.authorize``). Which route needs which scope is the
transport's: HTTP paths in ``http_auth``, gRPC methods in ``grpc_server``. In short, health
probes are open, ``/metrics`` is open unless ``protect_metrics`` (then either scope), the
repository extension (index, load, unload) needs ``admin`` and everything else ``inference``.

A missing or unknown token is 401 with ``WWW-Authenticate: Bearer``; a valid token of the
other scope is 403. Tokens are compared with ``hmac.compare_digest`` against EVERY configured
token (both lists, no early exit), so timing reveals neither a prefix nor which list matched.
Tokens never appear in logs, errors or reprs. No aiohttp here: gRPC imports this module.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cicada_async.service.config import AuthConfig

Scope = Literal["inference", "admin", "any"]

ENV_INFERENCE = "CICADA_INFERENCE_TOKENS"
ENV_ADMIN = "CICADA_ADMIN_TOKENS"


def merge_env(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> AuthConfig:
    """Add tokens from $CICADA_INFERENCE_TOKENS / $CICADA_ADMIN_TOKENS (comma lists).

    Read when the server starts (not at import), so tests and tools control the environment.
    """
    env = os.environ if environ is None else environ

    def merged(current: list[str], var: str) -> list[str]:
        extra = [t.strip() for t in env.get(var, "").split(",") if t.strip()]
        return current + [t for t in extra if t not in current]

    auth.inference_tokens = merged(auth.inference_tokens, ENV_INFERENCE)
    auth.admin_tokens = merged(auth.admin_tokens, ENV_ADMIN)
    return auth


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


# Which scope an HTTP path needs (aiohttp's middleware, http_auth, and the Ray ingress):
# open: the health probes, and /metrics unless protect_metrics (then any valid token);
# admin: the repository extension; inference: everything else, unknown paths included.
_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def scope_of(path: str, auth: AuthConfig) -> Scope | None:
    """The scope a path needs; None when it is open."""
    if path in _OPEN_PATHS:
        return None
    if path == "/metrics":
        return "any" if auth.protect_metrics else None
    if path == "/v2/repository" or path.startswith("/v2/repository/"):
        return "admin"
    return "inference"
