"""The node cache: remote objects written through to a local directory and served from it.

``CachingBackend`` wraps an S3 or HTTP backend. An object is addressed by its sha256 when the
model's ``cicada.manifest.json`` (read through this backend) lists it, else by its strong ETag
(scoped by origin and key, since HTTP ETags are only unique per resource). On a hit the cached
file is a local file: ``map_file``/``populate``/``read_into`` go to ``LocalBackend``, so the
engine lands it the way it lands a model on local disk. On a miss reads go to the origin and
each landed range is also written (one pwrite, in a thread) into a sparse temp file at its
offset; once every byte is there it is verified and committed by rename. A partial file is
discarded when the backend closes. The cache never fails a load: any local I/O error makes that
object uncached.

Verification on reuse: the sidecar's size and ETag (or sha256) must match the origin's stat,
and the file's size the sidecar's. With a sha256 the file is hashed on reuse (in a worker
thread, while the skeleton builds), once per process per unchanged file: a marker written at
commit would vouch only for the bytes as they were then, not after bit rot or an in-place edit.
Without a digest, size and ETag are all there is to check, as for reads from the origin itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from backends._cachestore import Fill, Hit, NodeCache
from backends.local import FileWatch, LocalBackend
from protocols.errors import ConfigError, ObjectChanged, StorageError
from protocols.storage import ObjectInfo, StorageBackend

log = logging.getLogger(__name__)

MANIFEST_NAME = "cicada.manifest.json"  # as cicada_async.engine.manifest, which we may not import
CACHE_KEYS = ("dir", "max_bytes")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CacheSettings:
    """The node cache's keys of the ``[cache]`` table."""

    dir: Path
    """Where entries live; one local file system (renames must be atomic)."""
    max_bytes: int = 16 << 30
    """Bytes of entries and fills in progress; least recently used entries not in use go first."""

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "CacheSettings":
        unknown = sorted(set(table) - set(CACHE_KEYS))
        if unknown:
            raise ConfigError(f"[cache]: unknown key(s) {', '.join(unknown)} (known: {', '.join(CACHE_KEYS)})")
        if not isinstance(table.get("dir"), str) or not table["dir"]:
            raise ConfigError("[cache] dir: a directory path is required")
        size = table.get("max_bytes", cls.max_bytes)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f"[cache] max_bytes: a positive integer, got {size!r}")
        return cls(Path(table["dir"]).expanduser(), size)


@dataclass
class _Miss:
    addr: str
    sha: str | None
    info: ObjectInfo
    fill: Fill | None = None
    reserved: bool = False  # a reservation was tried (fill None after it: no room, not cached)


@dataclass
class _HitState:
    hit: Hit
    info: ObjectInfo


@dataclass
class _Counters:
    origin_bytes: int = 0
    cache_bytes: int = 0
    outcomes: list[str] = field(default_factory=list)  # per fill: committed, lost, bad, failed


class EntryWatch:
    """The mapped entry's FileWatch, holding the entry's shared lock while the model views it."""

    def __init__(self, inner: FileWatch, lock_fd: int) -> None:
        self.inner = inner
        self.path = inner.path
        self._lock_fd = lock_fd

    def changed(self) -> bool:
        return self.inner.changed()

    def close(self) -> None:
        self.inner.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # never LOCK_UN: a dup'd fd shares the lock
            self._lock_fd = -1

    def __del__(self) -> None:
        self.close()


class CachingBackend:
    """``origin`` behind the node cache at ``settings.dir``; see the module docstring."""

    def __init__(self, origin: StorageBackend, source: str, settings: CacheSettings) -> None:
        self.origin = origin
        parts = urlsplit(source)
        # Part of every ETag address; credentials and queries are no part of an object's name.
        host = parts.netloc.rpartition("@")[2].lower()
        self.source = urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/"), "", ""))
        self.settings = settings
        self.alignment = origin.alignment  # hits are read through the origin's rules too
        self.counters = _Counters()
        self._store: NodeCache | None = None
        self._local: LocalBackend | None = None
        self._digests: dict[str, tuple[int, str]] = {}
        self._state: dict[str, _Miss | _HitState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._commits: set[asyncio.Task[None]] = set()
        self._io: set[asyncio.Future[Any]] = set()
        self._dropped: list[Fill] = []  # discarded at aclose, once no write can be in flight

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Cache I/O in a worker thread that finishes even if its caller is cancelled: aclose
        waits for it, so no descriptor is closed under a pwrite, and no lock or fill leaks."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._io.add(fut)
        fut.add_done_callback(self._io.discard)
        return fut

    async def _ready(self) -> tuple[NodeCache, LocalBackend] | None:
        if self._store is None:
            try:
                self._store = await asyncio.to_thread(NodeCache, self.settings.dir, self.settings.max_bytes)
                self._local = LocalBackend(self._store.entries)
            except (OSError, StorageError) as e:
                log.warning("node cache at %s unusable, reading from the origin: %s", self.settings.dir, e)
                return None
        assert self._local is not None
        return self._store, self._local

    def _address(self, key: str, info: ObjectInfo) -> tuple[str | None, str | None]:
        known = self._digests.get(key)
        if known is not None and known[0] == info.size:
            return f"sha256-{known[1]}", known[1]
        v = info.version
        if v and v.startswith('"'):  # strong ETag; weak ones and Last-Modified dates pin no bytes
            name = f"{self.source}\0{key}\0{v}\0{info.size}".encode()
            return f"etag-{hashlib.sha256(name).hexdigest()}", None
        return None, None

    async def stat(self, key: str) -> ObjectInfo:
        info = await self.origin.stat(key)
        async with self._locks.setdefault(key, asyncio.Lock()):
            await self._resolve(key, info)
        return info

    async def _resolve(self, key: str, info: ObjectInfo) -> None:
        addr, sha = self._address(key, info)
        cur = self._state.get(key)
        if cur is not None:
            if (cur.hit.addr if isinstance(cur, _HitState) else cur.addr) == addr and cur.info == info:
                return
            self._forget(key)
        ready = await self._ready() if addr is not None else None
        if ready is None or addr is None:
            return  # not cacheable: reads pass through
        fut = self._spawn(ready[0].open_entry, addr, info.size, info.version, sha)
        try:
            hit = await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_release_unused_hit)  # nobody will adopt its lock
            raise
        except OSError as e:
            log.warning("node cache: looking up %s failed: %s", key, e)
            return
        self._state[key] = _HitState(hit, info) if hit is not None else _Miss(addr, sha, info)

    def _forget(self, key: str) -> None:
        state = self._state.pop(key, None)
        if isinstance(state, _HitState):
            os.close(state.hit.lock_fd)
        elif isinstance(state, _Miss) and state.fill is not None and not state.fill.committing:
            self._dropped.append(state.fill)

    def _hit(self, key: str) -> _HitState:
        state = self._state.get(key)
        if not isinstance(state, _HitState):
            raise StorageError(f"{key} is not in the node cache")
        return state

    async def read_into(
        self, key: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        state = self._state.get(key)
        if isinstance(state, _HitState):
            if version is not None and version != state.info.version:
                raise ObjectChanged(f"{key}: version {version} is not the cached {state.info.version}")
            assert self._local is not None
            await self._local.read_into(state.hit.local_key, offset, buf, version=state.hit.local_version)
            self.counters.cache_bytes += len(buf)
        else:
            await self.origin.read_into(key, offset, buf, version=version)
            self.counters.origin_bytes += len(buf)
            if isinstance(state, _Miss) and version in (None, state.info.version):
                await self._write_through(key, state, buf, offset)
        if key == MANIFEST_NAME and offset == 0:
            # The digests address the weight files by content from their next stat on.
            self._digests = _manifest_digests(bytes(buf))

    async def _write_through(self, key: str, state: _Miss, buf: memoryview, offset: int) -> None:
        store = self._store
        assert store is not None
        try:
            if not state.reserved:
                async with self._locks.setdefault(key, asyncio.Lock()):
                    if not state.reserved:
                        fut = self._spawn(store.reserve, state.addr, state.info.size)
                        # Adopted even if this read is cancelled: aclose discards it then.
                        fut.add_done_callback(lambda f: _adopt_fill(state, f))
                        await asyncio.shield(fut)
            fill = state.fill
            if fill is None or fill.committing or fill.fd < 0:
                return
            await asyncio.shield(self._spawn(store.write, fill, buf, offset))
        except OSError as e:
            log.warning("node cache: writing %s failed, not caching it: %s", key, e)
            if state.fill is not None:
                self._dropped.append(state.fill)
                state.fill = None
            return
        if fill.add(offset, offset + len(buf)) and not fill.committing:
            fill.committing = True
            meta = {"key": key, "source": self.source, "etag": state.info.version, "sha256": state.sha}
            task = asyncio.get_running_loop().create_task(self._commit(store, fill, meta))
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)

    async def _commit(self, store: NodeCache, fill: Fill, meta: dict[str, Any]) -> None:
        # A write of overlapping bytes may still be in flight: its descriptor stays open.
        await asyncio.gather(*self._io, return_exceptions=True)
        try:
            outcome = await asyncio.to_thread(store.commit, fill, meta)
        except OSError as e:
            log.warning("node cache: committing %s failed: %s", meta["key"], e)
            outcome = "failed"
        self.counters.outcomes.append(outcome)

    def map_file(self, key: str, size: int) -> Any:
        """The cached file, mapped as LocalBackend maps files; StorageError on a miss."""
        state = self._hit(key)
        assert self._local is not None
        return self._local.map_file(state.hit.local_key, size)

    async def populate(self, key: str, mapping: Any, offset: int, length: int, *,
                       version: str | None = None) -> None:
        state = self._hit(key)
        assert self._local is not None
        await self._local.populate(state.hit.local_key, mapping, offset, length,
                                   version=state.hit.local_version)
        self.counters.cache_bytes += length

    def watch(self, key: str) -> EntryWatch:
        state = self._hit(key)
        assert self._local is not None
        return EntryWatch(self._local.watch(state.hit.local_key), os.dup(state.hit.lock_fd))

    async def aclose(self) -> None:
        """Waits for commits under way; drops partial fills and this backend's entry locks."""
        try:
            while self._io or self._commits:
                await asyncio.gather(*self._io, *self._commits, return_exceptions=True)
            for key in list(self._state):
                self._forget(key)
            dropped, self._dropped = self._dropped, []
            if dropped and self._store is not None:
                store = self._store

                def discard_all() -> None:
                    for f in dropped:
                        store.discard(f)

                await asyncio.to_thread(discard_all)
            if self._local is not None:
                await self._local.aclose()
        finally:
            await self.origin.aclose()


def _adopt_fill(state: _Miss, fut: asyncio.Future[Fill | None]) -> None:
    state.reserved = True
    state.fill = None if fut.cancelled() or fut.exception() else fut.result()


def _release_unused_hit(fut: asyncio.Future[Hit | None]) -> None:
    hit = fut.result() if not fut.cancelled() and fut.exception() is None else None
    if hit is not None:
        os.close(hit.lock_fd)


def _manifest_digests(raw: bytes) -> dict[str, tuple[int, str]]:
    """key -> (size, sha256) from a manifest; a malformed one gives none (the engine rejects it)."""
    try:
        files = json.loads(raw).get("files")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {
        k: (e["size"], e["sha256"])
        for k, e in files.items()
        if isinstance(e, dict) and isinstance(e.get("size"), int)
        and isinstance(e.get("sha256"), str) and _SHA256.fullmatch(e["sha256"])
    }
