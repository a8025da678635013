"""What an opened storage backend can do beyond the ``StorageBackend`` Protocol, asked once.

The engine decides here, when it opens a backend, whether weights may be mapped from the page
cache (``MappableFiles``) and whether plan files may be stored beside the model
(``LocalDirectory``); the read path then uses the typed answer instead of probing the object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from backends import open_backend
from protocols.storage import LocalDirectory, MappableFiles, StorageBackend


@dataclass(frozen=True)
class Capabilities:
    """One backend's optional abilities; ``None`` where it has none."""

    alignment: int
    """Offsets, lengths and addresses that allow a zero-copy direct read (at least 1)."""
    mappable: MappableFiles | None = None
    """The backend itself, when its objects are local files that can be mapped and watched."""
    root: Path | None = None
    """The model's local directory, when the backend reads one."""

    @classmethod
    def of(cls, backend: StorageBackend) -> Capabilities:
        """Ask ``backend`` once, right after it is opened."""
        root = backend.root if isinstance(backend, LocalDirectory) else None
        return cls(
            alignment=max(backend.alignment, 1),
            mappable=backend if isinstance(backend, MappableFiles) else None,
            root=root if isinstance(root, Path) else None,
        )


def open_with_capabilities(
    uri: str, settings: Mapping[str, object] | None = None, *, cache: Mapping[str, object] | None = None
) -> tuple[StorageBackend, Capabilities]:
    """``backends.open_backend`` and what the opened backend can do, in one step."""
    backend = open_backend(uri, settings, cache=cache)
    return backend, Capabilities.of(backend)
