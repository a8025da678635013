"""Page-cache state of weight files: evict them, and check with ``mincore`` that they are out.

A cold run is only cold if its files are not resident. ``posix_fadvise(DONTNEED)`` silently
keeps pages that are dirty, mapped or locked, so every cold repetition checks the result
(``mincore`` over a fresh mapping of each file) instead of trusting the call.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

PAGE = mmap.PAGESIZE


def _mincore() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    fn = ctypes.CDLL(None, use_errno=True).mincore
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    fn.restype = ctypes.c_int
    return fn


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (mincore; whole pages, capped at the size)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        # Private and writable only so that ctypes can take its address; nothing touches it,
        # so mincore sees the page cache's pages.
        m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        buf = (ctypes.c_char * size).from_buffer(m)
        vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
        rc = _mincore()(ctypes.addressof(buf), size, vec)
        del buf
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"mincore({path})")
    finally:
        m.close()
    return min(size, sum(b & 1 for b in bytes(vec)) * PAGE)


def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def evict(path: Path) -> None:
    """Drop every file under ``path`` from the page cache (no root needed)."""
    os.sync()  # dirty pages are not dropped
    for f in files_of(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict_checked(path: Path, *, tolerance_bytes: int = 1 << 20) -> int:
    """Evict, then verify with mincore; raises if more than ``tolerance_bytes`` stayed resident.

    As root, the kernel's whole clean page cache is dropped too when DONTNEED left pages.
    Returns the bytes still resident (at most the tolerance).
    """
    evict(path)
    left = sum(resident_bytes(f) for f in files_of(path))
    if left > tolerance_bytes and os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
        except OSError:
            pass
        left = sum(resident_bytes(f) for f in files_of(path))
    if left > tolerance_bytes:
        raise RuntimeError(f"{path}: {left} bytes still in the page cache after eviction; the run would not be cold")
    return left


def warm(path: Path) -> int:
    """Read every file under ``path`` into the page cache; returns the bytes now resident."""
    for f in files_of(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
    return sum(resident_bytes(f) for f in files_of(path))
