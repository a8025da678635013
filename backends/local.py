"""Local-disk backend: ranged reads into caller buffers, O_DIRECT when the buffer allows it."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from protocols.errors import IntegrityError, ObjectChanged, ObjectNotFound, StorageError
from protocols.storage import ObjectInfo

# O_DIRECT needs offsets, lengths and addresses aligned to the logical block size; 4096 covers
# every block size in use and matches the page size, so page-aligned arenas qualify.
DIRECT_ALIGN = 4096

# Disk reads (preadv, MADV_POPULATE_READ, stat) run on threads of the backend's own, never on
# the loop's default executor: that pool (min(32, cores + 4) threads) also carries request body
# codecs, whole-file hashes and CUDA event waits, so a packed cold start's hashes or a burst of
# large bodies would queue weight reads behind them, and a read behind them stalls the layer
# that waits for it. Bounded, so one backend's reads cannot take a thread per call.
IO_THREADS = 8
T = TypeVar("T")


def _addr(buf: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _addr_of(mapping: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


_MADV_POPULATE_READ = 22  # Linux 5.14+
_libc: ctypes.CDLL | None = None


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    fn = getattr(_libc, "madvise", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def _populate_call(addr: int, length: int) -> int:
    # ctypes releases the GIL around the call, so the loop runs while the kernel reads.
    fn = _madvise()
    if fn is None:
        return errno.ENOSYS
    return 0 if fn(addr, length, _MADV_POPULATE_READ) == 0 else ctypes.get_errno()


_populate_ok: bool | None = None


def _populate_supported() -> bool:
    global _populate_ok
    if _populate_ok is None:
        if not sys.platform.startswith("linux"):
            _populate_ok = False
        else:
            m = mmap.mmap(-1, mmap.PAGESIZE)
            try:
                _populate_ok = _populate_call(_addr_of(m), mmap.PAGESIZE) == 0
            finally:
                m.close()
    return _populate_ok


class LocalBackend:
    """Files under one root directory; keys are relative paths that must stay inside it."""

    def __init__(
        self, root: str | os.PathLike[str], *, direct_io: bool = True, io_threads: int = IO_THREADS
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ObjectNotFound(f"model directory {self.root} does not exist")
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self.alignment = DIRECT_ALIGN if self.direct_io else 1
        self._fds: dict[tuple[str, bool], int] = {}
        self.io_threads = max(1, io_threads)
        # Made on the first call and shut down at aclose (a later call makes a new one, as the
        # descriptors reopen): a backend that is never read starts no thread.
        self._io: ThreadPoolExecutor | None = None

    @classmethod
    def from_uri(cls, uri: str, settings: dict[str, Any]) -> "LocalBackend":
        parts = urlsplit(uri)
        path = unquote(parts.path) if parts.scheme == "file" else uri
        return cls(
            path,
            direct_io=bool(settings.get("direct_io", True)),
            io_threads=int(settings.get("io_threads", IO_THREADS)),
        )

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the backend's disk threads (blocking syscalls, GIL released)."""
        if self._io is None:
            self._io = ThreadPoolExecutor(self.io_threads, thread_name_prefix="cicada-disk")
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

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
            st = await self._run(os.stat, path)
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
                    n = await self._run(os.preadv, fd, [buf[got:body]], offset + got)
                    if n <= 0:
                        break
                    got += n
                    if got % DIRECT_ALIGN:
                        break  # short direct read: finish through the page cache
            fd = self._fd(key, False)
            while got < want:
                n = await self._run(os.preadv, fd, [buf[got:]], offset + got)
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

    def map_file(self, key: str, size: int) -> mmap.mmap:
        """A private (copy-on-write) mapping of the file: tensors can view the page cache.

        Raises StorageError where the kernel cannot populate mappings (before Linux 5.14).
        """
        if not _populate_supported():
            raise StorageError("MADV_POPULATE_READ is not supported by this kernel")
        fd = self._fd(key, False)
        if os.fstat(fd).st_size != size:
            raise ObjectChanged(f"{self.root / key} changed size since its header was read")
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def watch(self, key: str) -> FileWatch:
        """A handle that tells whether the file mapped for ``key`` was changed in place."""
        return FileWatch(self._path(key), self._fd(key, False))

    async def populate(
        self, key: str, mapping: mmap.mmap, offset: int, length: int, *, version: str | None = None
    ) -> None:
        """Read [offset, offset + length) of the mapped file into the page cache and map it.

        The kernel reads straight into page-cache pages that the mapping then points at: no
        copy and no zeroing of fresh memory, so the CPU stays free for compute.
        """
        lo = offset - offset % mmap.PAGESIZE
        err = await self._run(_populate_call, _addr_of(mapping) + lo, length + offset - lo)
        if err:
            raise StorageError(f"reading {self.root / key} at {offset}: {os.strerror(err)}")
        if version is not None and self._version(os.fstat(self._fd(key, False))) != version:
            raise ObjectChanged(f"{self.root / key} changed while it was being read")

    async def aclose(self) -> None:
        # Not waited for: a read still in flight belongs to a caller that is going away; its
        # threads end once it returns (with EBADF at worst, as before this pool existed).
        io, self._io = self._io, None
        if io is not None:
            io.shutdown(wait=False)
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class FileWatch:
    """Notices an in-place change (rewrite, truncation) of a mapped weight file.

    A private mapping shares the page cache's pages until written, so an in-place rewrite
    changes what the tensors hold, and a truncation makes the next touch past the end a
    SIGBUS. A file replaced by rename is safe: the held descriptor pins the old inode, whose
    identity this never sees change.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = os.dup(fd)  # the backend's descriptors close after the load
        self._identity = self._now()

    def _now(self) -> tuple[int, int]:
        st = os.fstat(self._fd)
        return st.st_size, st.st_mtime_ns

    def changed(self) -> bool:
        try:
            return self._now() != self._identity
        except OSError:
            return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
