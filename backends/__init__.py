"""Storage backends, one module each, chosen by the scheme of a model's URI.

Adding a backend means one module whose class satisfies ``protocols.storage.StorageBackend``
and has ``from_uri``, plus one entry in ``_REGISTRY`` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from protocols.errors import ConfigError
from protocols.storage import StorageBackend

# scheme -> "module:Class"; modules are imported lazily so that a local load never pays for
# importing aiobotocore or aiohttp.
_REGISTRY: dict[str, str] = {
    "file": "backends.local:LocalBackend",
    "s3": "backends.s3:S3Backend",
    "http": "backends.http:HTTPBackend",
    "https": "backends.http:HTTPBackend",
    "memory": "backends.memory:MemoryBackend",  # a local directory served from RAM, for tests
}


def scheme_of(uri: str) -> str:
    """The registry key for ``uri``: a plain path counts as ``file``."""
    scheme = urlsplit(uri).scheme.lower()
    # A one-letter "scheme" is a Windows drive, and no scheme is a plain path.
    return "file" if len(scheme) <= 1 else scheme


class BackendClass(Protocol):
    """A backend module's class, as the registry names it."""

    def from_uri(self, uri: str, settings: dict[str, Any], /) -> StorageBackend:
        """A backend rooted at ``uri`` with its ``[storage.<scheme>]`` settings."""
        ...


def backend_class(uri: str) -> BackendClass:
    scheme = scheme_of(uri)
    target = _REGISTRY.get(scheme)
    if target is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"no storage backend for scheme {scheme!r} in {uri!r} (known: {known})")
    module_name, _, cls_name = target.partition(":")
    cls: BackendClass = getattr(importlib.import_module(module_name), cls_name)  # the registry's entry
    return cls


# Schemes whose objects the node cache keeps; local files need no second copy.
CACHED_SCHEMES = ("s3", "http", "https")


def open_backend(
    uri: str, settings: Mapping[str, Any] | None = None, *, cache: Mapping[str, Any] | None = None
) -> StorageBackend:
    """A backend rooted at ``uri``; ``settings`` is that backend's table from the config.

    ``cache`` holds the node cache's keys of ``[cache]`` (``dir``, ``max_bytes``); with a
    ``dir``, remote backends are wrapped so that their reads write through to it.
    """
    backend: StorageBackend = backend_class(uri).from_uri(uri, dict(settings or {}))
    if cache and cache.get("dir") and scheme_of(uri) in CACHED_SCHEMES:
        from backends.cache import CacheSettings, CachingBackend

        backend = CachingBackend(backend, uri, CacheSettings.from_table(cache))
    return backend
