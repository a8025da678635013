"""Local-disk backend: ranged reads into caller buffers, O_DIRECT when the buffer allows it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiofiles.os

from protocols.errors import IntegrityError, ObjectChanged, ObjectNotFound, StorageError
from protocols.storage import ObjectInfo

# O_DIRECT needs offsets, lengths and addresses aligned to the logical block size; 4096 covers
# every block size in use and matches the page size, so page-aligned arenas qualify.
DIRECT_ALIGN = 4096

_preadv = aiofiles.os.wrap(os.preadv)  # runs in the loop's default executor, off the loop


def _addr(buf: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class LocalBackend:
    """Files under one root directory; keys are relative paths that must stay inside it."""

    def __init__(self, root: str | os.PathLike[str], *, direct_io: bool = True) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ObjectNotFound(f"model directory {self.root} does not exist")
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self.alignment = DIRECT_ALIGN if self.direct_io else 1
        self._fds: dict[tuple[str, bool], int] = {}

    @classmethod
    def from_uri(cls, uri: str, settings: dict[str, Any]) -> "LocalBackend":
        parts = urlsplit(uri)
        path = unquote(parts.path) if parts.scheme == "file" else uri
        return cls(path, direct_io=bool(settings.get("direct_io", True)))

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or "\\" in key or ".." in Path(key).parts:
            raise StorageError(f"storage key {key!r} is not a relative path inside the model")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"storage key {key!r} leaves the model directory")
        return path

    def _fd(self, key: str, direct: bool) -> int:
        fd = self._fds.get((key, direct))
        if fd is None:
            flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
            if direct:
                flags |= os.O_DIRECT
            try:
                fd = os.open(self._path(key), flags)
            except FileNotFoundError:
                raise ObjectNotFound(f"{self.root / key} does not exist") from None
            except OSError as e:
                if direct and e.errno == errno.EINVAL:  # tmpfs and some FUSE mounts
                    self.direct_io = False
                    self.alignment = 1
                    return self._fd(key, False)
                raise StorageError(f"cannot open {self.root / key}: {e.strerror}") from e
            self._fds[(key, direct)] = fd
        return fd

    @staticmethod
    def _version(st: os.stat_result) -> str:
        return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = await aiofiles.os.stat(path)
        except FileNotFoundError:
            raise ObjectNotFound(f"{path} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot stat {path}: {e.strerror}") from e
        return ObjectInfo(key=key, size=st.st_size, version=self._version(st))

    async def read_into(
        self, key: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        want = len(buf)
        got = 0
        direct = (
            self.direct_io
            and offset % DIRECT_ALIGN == 0
            and _addr(buf) % DIRECT_ALIGN == 0
            and want >= DIRECT_ALIGN
        )
        try:
            if direct:
                # The aligned body goes straight from disk into buf; a ragged tail (the end of
                # the file) is read through the page cache below.
                body = want - want % DIRECT_ALIGN
                fd = self._fd(key, True)
                while got < body:
                    n = await _preadv(fd, [buf[got:body]], offset + got)
                    if n <= 0:
                        break
                    got += n
                    if got % DIRECT_ALIGN:
                        break  # short direct read: finish through the page cache
            fd = self._fd(key, False)
            while got < want:
                n = await _preadv(fd, [buf[got:]], offset + got)
                if n <= 0:
                    break
                got += n
        except OSError as e:
            raise StorageError(f"reading {self.root / key} at {offset}: {e.strerror}") from e
        if got != want:
            raise IntegrityError(
                f"{self.root / key} ended early: wanted {want} bytes at offset {offset}, got {got}"
            )
        if version is not None:
            # An open descriptor pins the inode, so a file replaced by rename keeps serving the
            # old bytes consistently; only an in-place rewrite can change what we read.
            if self._version(os.fstat(fd)) != version:
                raise ObjectChanged(f"{self.root / key} changed while it was being read")

    async def aclose(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
