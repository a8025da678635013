"""The storage-backend Protocol: what the fetcher needs from local disk, S3 or HTTP."""

from __future__ import annotations

from dataclasses import dataclass
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
