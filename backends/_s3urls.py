"""Presigned GET URLs for the S3 backend's threaded data path: their reuse, and their expiry.

A URL is valid an hour and reused for ten minutes. It also dies with the temporary credentials
that signed it (IRSA, instance profiles, SSO): botocore refreshes them 10-15 minutes before they
expire, but a refresh that failed, or credentials issued with a short life, leave a cached URL
to be refused. ``S3Backend`` answers such a refusal (``expired``) by signing again, once per
chunk, with the credentials botocore holds then, and never hands the refused URL out again.
"""

from __future__ import annotations

import time
import urllib.request
from urllib.parse import urlsplit

from protocols.errors import StorageError

URL_EXPIRES_S = 3600
URL_REUSE_S = 600
# Dead session credentials (ExpiredToken; TokenRefreshRequired), a request past its expiry.
_EXPIRED_CODES = frozenset({"ExpiredToken", "TokenRefreshRequired", "RequestExpired"})


class UrlExpired(StorageError):
    """A presigned URL refused because it, or the credentials that signed it, expired."""


def expired(status: int, code: str, message: str) -> bool:
    """Whether an S3 error answer refuses an expired URL or credentials (AccessDenied "Request
    has expired" is S3's answer to a URL past its X-Amz-Expires)."""
    return status in (400, 403) and (
        code in _EXPIRED_CODES or (code == "AccessDenied" and "expired" in message.lower())
    )


def proxied(url: str) -> bool:
    """Whether the environment routes ``url`` through a proxy (which only botocore speaks)."""
    parts = urlsplit(url)
    return parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(
        parts.hostname or ""
    )


class UrlCache:
    """Each object's latest presigned URL, reused for ``URL_REUSE_S``."""

    def __init__(self) -> None:
        self._urls: dict[str, tuple[str, float]] = {}

    def get(self, obj: str, stale: str | None = None) -> str | None:
        """The URL to reuse for ``obj``, if any; ``stale`` (one refused as expired) is dropped."""
        cached = self._urls.get(obj)
        if cached is None or cached[0] == stale or time.monotonic() - cached[1] >= URL_REUSE_S:
            self._urls.pop(obj, None)
            return None
        return cached[0]

    def put(self, obj: str, url: str) -> None:
        self._urls[obj] = (url, time.monotonic())
