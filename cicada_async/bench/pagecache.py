"""Page-cache state of model files: evict, warm, and check with ``mincore`` that it worked.

``posix_fadvise(DONTNEED)`` is a hint: the kernel keeps pages that some process still maps
(another server on the same node, a leftover worker), and some filesystems ignore it. A cold
run that silently read from memory would flatter whoever ran it, so the benchmark asks the
kernel afterwards which pages are resident and refuses to count a run whose files are not.

``mincore`` reports page-cache residency for a file mapping only where the caller owns the file
or may write it (Linux 5.0+); otherwise it reports only the caller's own mapped pages, which
reads as "evicted". The check says so (``trusted``) rather than pass on such a file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

_PAGE = mmap.PAGESIZE
_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.mmap.restype = ctypes.c_void_p
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return _libc


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def resident_pages(path: Path) -> tuple[int, int]:
    """(resident, total) pages of ``path`` in the page cache, by mmap + mincore.

    Mapping a file does not read it: no page is faulted in, so the check does not disturb
    what it measures.
    """
    size = path.stat().st_size
    total = (size + _PAGE - 1) // _PAGE
    if size == 0:
        return 0, 0
    lib = libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = ctypes.create_string_buffer(total)
            if lib.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(b & 1 for b in vec.raw), total
        finally:
            lib.munmap(addr, size)
    finally:
        os.close(fd)


@dataclass
class Residency:
    resident_bytes: int
    total_bytes: int
    trusted: bool  # False where mincore cannot see the page cache of these files (not owned)

    @property
    def fraction(self) -> float:
        return self.resident_bytes / self.total_bytes if self.total_bytes else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"resident_bytes": self.resident_bytes, "total_bytes": self.total_bytes,
                "fraction": round(self.fraction, 6), "trusted": self.trusted}


def residency(files: list[Path]) -> Residency:
    resident = total = 0
    trusted = True
    for f in files:
        r, t = resident_pages(f)
        resident += r * _PAGE
        total += t * _PAGE
        trusted &= f.stat().st_uid == os.geteuid() or os.access(f, os.W_OK)
    return Residency(resident, total, trusted)


def drop_page_cache(path: Path) -> None:
    """Evict every file under ``path`` from the page cache (works without root)."""
    os.sync()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass


def make_cold(model_dir: Path, tries: int = 3) -> Residency:
    """Drop the model's pages, re-dropping up to ``tries`` times; the residency left after.

    Any resident weight page makes the state "not cold": the caller counts such a run invalid.
    """
    files = weight_files(model_dir)
    r = residency(files)
    for _ in range(tries):
        drop_page_cache(model_dir)
        r = residency(files)
        if r.resident_bytes == 0:
            break
    return r


def make_warm(model_dir: Path, tries: int = 2) -> Residency:
    """Read every weight page into the page cache and check that all of them stayed."""
    files = weight_files(model_dir)
    r = residency(files)
    for _ in range(tries):
        read_all(files)
        r = residency(files)
        if r.resident_bytes >= r.total_bytes:
            break
    return r


# -- whole-path helpers (the process-start benchmark and the prefetch tests) --------------------
PAGE = _PAGE


def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` (a file) in the page cache now: whole pages, capped at its size."""
    return min(path.stat().st_size, resident_pages(path)[0] * _PAGE)


def evict(path: Path) -> None:
    drop_page_cache(path)


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
    files = files_of(path)
    read_all(files)
    return sum(resident_bytes(f) for f in files)
