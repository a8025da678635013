"""The node cache's directory: entries, fills in progress, locks and LRU eviction (sync; run it in
threads). ``backends.cache`` puts a storage backend in front of it.

Layout under the cache ``dir`` (one file system, so that every rename is atomic)::

    entries/<addr>/data, meta.json   a committed entry: a directory renamed into place whole
    tmp/<addr>.XXXX/data             a fill in progress, flocked by its writer while it lives
    locks/<addr>.lock                flock: shared while the entry is in use, exclusive to drop
    trash/                           dropped entries, renamed out of entries/ before removal
    .lock                            flock held while space is reserved (scan and evict)

An entry becomes visible only by the rename of a complete, fsynced directory holding both its
data and its sidecar, so no reader ever sees a torn entry; a fill whose rename finds the name
taken lost a race to another filler of the same bytes and is discarded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.local import LocalBackend

log = logging.getLogger(__name__)

# Files proven to hash to their entry's sha256, by identity: (addr, dev, ino, size, mtime_ns,
# ctime_ns). Any write, truncation or utime changes ctime, so a file edited in place since it
# was hashed is hashed again; a process re-loading a model it already checked hashes nothing.
_VERIFIED: set[tuple[Any, ...]] = set()
_LOCK_WAIT_S = 2.0  # exclusive holders only rename and unlink; longer means something is stuck


def _identity(addr: str, st: os.stat_result) -> tuple[Any, ...]:
    return (addr, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _touch(entry: Path) -> None:
    # Last use, for LRU: the directory's mtime, not the data file's (its identity pins the
    # mapping), set from the fine clock (file system timestamps tick in jiffies).
    now = time.time_ns()
    os.utime(entry, ns=(now, now))


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view, pos = memoryview(buf), 0
    while n := os.preadv(fd, [view], pos):  # hashlib releases the GIL on large updates
        h.update(view[:n])
        pos += n
    return h.hexdigest()


@dataclass
class Hit:
    """A valid entry, held with a shared lock so that no process drops or evicts it."""

    addr: str
    lock_fd: int
    local_version: str  # the data file's identity as LocalBackend reports it

    @property
    def local_key(self) -> str:
        return f"{self.addr}/data"


@dataclass
class Fill:
    """A sparse temp file that ranges land in at their offsets until every byte is written."""

    addr: str
    dir: Path
    fd: int
    size: int
    spans: list[tuple[int, int]] = field(default_factory=list)  # written, merged, sorted
    committing: bool = False

    def add(self, lo: int, hi: int) -> bool:
        """Record [lo, hi) as written; True once the whole file is."""
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.spans, (lo, hi)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.spans = merged
        return merged == [(0, self.size)]


class NodeCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.entries, self.tmp, self.locks, self.trash = (
            root / n for n in ("entries", "tmp", "locks", "trash")
        )
        for d in (self.entries, self.tmp, self.locks, self.trash):
            d.mkdir(parents=True, exist_ok=True)

    # locks -----------------------------------------------------------------------------------
    def _flock(self, path: Path, op: int, wait_s: float) -> int | None:
        """An fd holding ``op`` on ``path``, or None if not granted within ``wait_s``.

        Lock files are unlinked when their entry is dropped, so a lock taken on a file that
        is no longer the one at ``path`` protects nothing: take it again on the new one.
        """
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def _entry_lock(self, addr: str, op: int, wait_s: float = _LOCK_WAIT_S) -> int | None:
        return self._flock(self.locks / f"{addr}.lock", op, wait_s)

    # reuse -----------------------------------------------------------------------------------
    def open_entry(self, addr: str, size: int, etag: str | None, sha: str | None) -> Hit | None:
        """The entry ``addr`` if it is there and valid, held shared; an invalid one is dropped."""
        fd = self._entry_lock(addr, fcntl.LOCK_SH)
        if fd is None:
            return None
        try:
            problem, version = self._check(addr, size, etag, sha)
        except OSError as e:
            problem, version = f"unreadable ({e.strerror})", ""
        if problem is None:
            _touch(self.entries / addr)
            return Hit(addr, fd, version)
        os.close(fd)
        if problem != "absent":
            log.warning("node cache: dropping entry %s: %s", addr, problem)
            self.drop(addr)
        return None

    def _check(self, addr: str, size: int, etag: str | None, sha: str | None) -> tuple[str | None, str]:
        d = self.entries / addr
        if not d.is_dir():
            return "absent", ""
        try:
            meta = json.loads((d / "meta.json").read_bytes())
        except FileNotFoundError:
            return "its sidecar meta.json is missing", ""
        except ValueError:
            return "its sidecar meta.json is not JSON", ""
        with open(d / "data", "rb") as f:
            st = os.fstat(f.fileno())
            if not isinstance(meta, dict) or meta.get("size") != size or st.st_size != size:
                return f"{st.st_size} bytes, sidecar says {meta.get('size')}, origin {size}", ""
            if sha is None and meta.get("etag") != etag:
                return f"ETag {meta.get('etag')!r} is not {etag!r}", ""
            if sha is not None:
                if meta.get("sha256") != sha:
                    return "its sidecar names another sha256", ""
                if _identity(addr, st) not in _VERIFIED:
                    if _sha256(f.fileno()) != sha:
                        return "its bytes do not hash to the manifest's sha256", ""
                    _VERIFIED.add(_identity(addr, st))
        return None, LocalBackend._version(st)

    def drop(self, addr: str) -> bool:
        """Remove entry ``addr`` unless some process (this one included) has it in use."""
        fd = self._entry_lock(addr, fcntl.LOCK_EX, wait_s=0)
        if fd is None:
            return False
        try:
            self._remove(self.entries / addr)
            os.unlink(self.locks / f"{addr}.lock")  # under the lock: see _flock
        finally:
            os.close(fd)
        return True

    def _remove(self, path: Path) -> None:
        # Rename first: removal is not atomic, the rename is, so nobody sees half an entry.
        gone = self.trash / f"{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    # fills -----------------------------------------------------------------------------------
    def reserve(self, addr: str, size: int) -> Fill | None:
        """A fill for ``size`` bytes once the LRU entries not in use made room; None if they can't."""
        if size > self.max_bytes:
            return None
        glock = self._flock(self.root / ".lock", fcntl.LOCK_EX, wait_s=5.0)
        if glock is None:
            return None
        try:
            if not self._make_room(size):
                return None
            d = Path(tempfile.mkdtemp(prefix=f"{addr}.", dir=self.tmp))
            fd = os.open(d / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # alive while its writer lives, even if it crashes
            os.ftruncate(fd, size)  # sparse: its size is what the next reservation counts
            return Fill(addr, d, fd, size)
        finally:
            os.close(glock)

    def _make_room(self, need: int) -> bool:
        used = self._live_fills()
        entries = []
        for d in self.entries.iterdir():
            try:
                entries.append((d.stat().st_mtime_ns, (d / "data").stat().st_size, d.name))
            except OSError:
                entries.append((0, 0, d.name))  # broken: first to go
        used += sum(n for _, n, _ in entries)
        for _, n, addr in sorted(entries):
            if used + need <= self.max_bytes:
                break
            if self.drop(addr):
                used -= n
        return used + need <= self.max_bytes

    def _live_fills(self) -> int:
        """Bytes reserved by fills in progress; fills whose writer died are removed."""
        live = 0
        for d in self.tmp.iterdir():
            try:
                fd = os.open(d / "data", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                shutil.rmtree(d, ignore_errors=True)  # died before its data file existed
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(d, ignore_errors=True)
            except BlockingIOError:
                live += os.fstat(fd).st_size
            finally:
                os.close(fd)
        for d in self.trash.iterdir():  # left by a process that died mid-removal
            shutil.rmtree(d, ignore_errors=True)
        return live

    def write(self, fill: Fill, data: memoryview, offset: int) -> None:
        view = data.cast("B") if data.format != "B" else data
        done = 0
        while done < len(view):
            done += os.pwrite(fill.fd, view[done:], offset + done)

    def commit(self, fill: Fill, meta: dict[str, Any]) -> str:
        """Make ``fill`` the entry: "committed", "lost" (another filler was first) or "bad"."""
        try:
            sha = meta.get("sha256")
            if sha is not None and _sha256(fill.fd) != sha:
                log.warning("node cache: %s does not hash to the manifest's sha256; not kept", meta["key"])
                return "bad"
            side = os.open(fill.dir / "meta.json", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(side, json.dumps({**meta, "size": fill.size, "committed_at": time.time()}).encode())
                os.fsync(side)
            finally:
                os.close(side)
            os.fsync(fill.fd)
            try:
                os.rename(fill.dir, self.entries / fill.addr)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return "lost"
                raise
            _touch(self.entries / fill.addr)
            dfd = os.open(self.entries, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)  # the rename itself survives a crash
            finally:
                os.close(dfd)
            if sha is not None:
                _VERIFIED.add(_identity(fill.addr, os.fstat(fill.fd)))
            return "committed"
        finally:
            self.discard(fill)

    def discard(self, fill: Fill) -> None:
        """Close the fill's file; its directory goes unless it was committed."""
        if fill.fd >= 0:
            os.close(fill.fd)
            fill.fd = -1
        shutil.rmtree(fill.dir, ignore_errors=True)
