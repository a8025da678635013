"""In-memory backend with fault injection: the storage used by tests of the pipeline itself."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import IntegrityError, ObjectChanged, ObjectNotFound, StorageError
from protocols.storage import ObjectInfo


@dataclass
class Faults:
    """What goes wrong, and when."""

    fail_after_bytes: int | None = None  # raise StorageError once this many bytes were served
    stall_after_bytes: int | None = None  # never answer once this many bytes were served
    short_by: int = 0  # every read returns this many bytes too few
    short_past_offset: int = -1  # ...but only reads that start past this offset (0: weights only)
    delay_s: float = 0.0  # latency added to every read


class MemoryBackend:
    """Objects held in a dict; ``faults`` makes reads fail, stall or come up short."""

    alignment = 1

    def __init__(self, objects: dict[str, bytes], faults: Faults | None = None) -> None:
        self.objects = dict(objects)
        self.faults = faults or Faults()
        self.served = 0
        self.reads = 0
        self.on_read: Callable[[int], None] | None = None
        self.closed = False

    @classmethod
    def from_dir(cls, path: str | Path, faults: Faults | None = None) -> "MemoryBackend":
        root = Path(path)  # keys are relative paths, as in a bucket (".cicada/plan-....json")
        return cls({p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}, faults)

    @classmethod
    def from_uri(cls, uri: str, settings: dict[str, Any]) -> "MemoryBackend":
        """``[storage.memory] delay_s = ...`` adds latency to every read (a slow origin)."""
        delay = float(settings.get("delay_s", 0.0))
        return cls.from_dir(uri.removeprefix("memory://"), Faults(delay_s=delay) if delay else None)

    def replace(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    async def stat(self, key: str) -> ObjectInfo:
        data = self.objects.get(key)
        if data is None:
            raise ObjectNotFound(f"memory://{key} does not exist")
        return ObjectInfo(key, len(data), hashlib.sha1(data).hexdigest())

    async def read_into(self, key: str, offset: int, buf: memoryview, *, version: str | None = None) -> None:
        f = self.faults
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self.reads)  # tests: act after exactly N reads (replace an object)
        if f.delay_s:
            await asyncio.sleep(f.delay_s)
        info = await self.stat(key)
        if version is not None and info.version != version:
            raise ObjectChanged(f"memory://{key} changed while it was being read")
        if f.stall_after_bytes is not None and self.served >= f.stall_after_bytes:
            await asyncio.Event().wait()  # a stalled origin: only a timeout ends this
        if f.fail_after_bytes is not None and self.served >= f.fail_after_bytes:
            raise StorageError(f"memory://{key}: injected failure at offset {offset}")
        data = self.objects[key][offset : offset + len(buf)]
        n = max(0, len(data) - f.short_by) if offset > f.short_past_offset else len(data)
        buf[:n] = data[:n]
        self.served += n
        if n != len(buf):
            raise IntegrityError(f"memory://{key} ended early: wanted {len(buf)} bytes at {offset}, got {n}")

    async def aclose(self) -> None:
        self.closed = True
