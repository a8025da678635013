"""The storage-backend Protocol: what the fetcher needs from local disk, S3 or HTTP."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    """What a backend knows about one object before reading it."""

    key: str
    size: int
    # Opaque version token (S3 ETag, HTTP ETag, or mtime+size for files). Passed back to
    # read_into so that a replaced object fails with ObjectChanged instead of mixing versions.
    version: str | None = None


@runtime_checkable
class StorageBackend(Protocol):
    """A source of model files addressed by keys relative to the model's root URI.

    Implementations raise only subclasses of ``protocols.errors.StorageError``.
    """

    # Offsets, lengths and buffer addresses that are multiples of this allow a zero-copy
    # direct read (O_DIRECT on local disk); 1 when the backend has no such preference.
    alignment: int

    async def stat(self, key: str) -> ObjectInfo:
        """Size and version of the object at ``key``."""
        ...

    async def read_into(
        self, key: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        """Fill all of ``buf`` with the object's bytes from ``offset``.

        Raises IntegrityError when the object has fewer bytes, ObjectChanged when ``version``
        is given and no longer matches, StorageTimeout when the read stalls.
        """
        ...

    async def aclose(self) -> None:
        """Release connections, file descriptors and threads."""
        ...


# Optional abilities. The engine asks for them once, when it opens a backend
# (``cicada_async.engine.capabilities.Capabilities.of``), never by probing on the read path.


@runtime_checkable
class FileWatch(Protocol):
    """Tells whether a mapped file was changed in place since it was mapped."""

    @property
    def path(self) -> Path: ...

    def changed(self) -> bool:
        """True once the file's size or mtime differs from when it was watched."""
        ...

    def close(self) -> None:
        """Release the descriptor (and any lock) the watch holds; idempotent."""
        ...


@runtime_checkable
class MappableFiles(Protocol):
    """A backend whose objects are local files: tensors may view their page-cache pages."""

    def map_file(self, key: str, size: int) -> mmap.mmap:
        """A private mapping of ``key``'s ``size`` bytes; StorageError where none can be made."""
        ...

    async def populate(
        self, key: str, mapping: mmap.mmap, offset: int, length: int, *, version: str | None = None
    ) -> None:
        """Read [offset, offset + length) of the mapped file into the page cache, in place."""
        ...

    def watch(self, key: str) -> FileWatch:
        """A handle that notices an in-place change of the file mapped for ``key``."""
        ...


@runtime_checkable
class LocalDirectory(Protocol):
    """A backend rooted at a local directory (plan files may be written beside the model)."""

    @property
    def root(self) -> Path: ...
