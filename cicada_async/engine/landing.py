"""Where fetched bytes land and how they become tensors: one strategy per target device.

- ``ArenaLanding`` (CPU): file-shaped arenas; a tensor is a view of the bytes it landed in.
- ``MappedLanding`` (CPU, local files): the files mapped; reads populate the mapping.
- ``StagingLanding`` (CUDA; engine/staging.py, with ``landing_for``, which picks one).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from protocols.errors import StorageError
from protocols.manifest import FileHeader, Plan, ReadRange, TensorEntry
from protocols.storage import FileWatch, MappableFiles, StorageBackend

from cicada_async.engine.arena import PAGE, Arena
from cicada_async.engine.reads import MAX_GAP_BYTES
from cicada_async.engine.tensorbytes import tensor_from_bytes


class Landing(Protocol):
    """Where one load's bytes land. Every landing has every member: the pipeline never probes."""

    @property
    def slab_bytes(self) -> int | None:
        """The most bytes one read may carry (staging slabs), or None: reads of any size."""
        ...

    @property
    def watches(self) -> Sequence[FileWatch]:
        """Files the loaded tensors view, to be checked before warm forwards (mapped files)."""
        ...

    def try_reserve(self, r: int, read: ReadRange) -> bool:
        """Take what read ``r`` will land in, if it is free now (True: nothing to wait for)."""
        ...

    async def reserve(self, r: int, read: ReadRange) -> None:
        """Wait for what read ``r`` will land in: before its read slot and outside its read
        timeout, since it waits for compute (a staging slab's copy), not for storage."""
        ...

    async def fill(self, r: int, read: ReadRange, backend: StorageBackend, version: str | None) -> None:
        """Fetch read ``r``'s bytes from ``backend`` to where they land (after ``reserve``)."""
        ...

    def read_landed(self, r: int, read: ReadRange) -> None:
        """Loop thread: read ``r`` has filled its buffer."""
        ...

    def make_tensor(self, entry: TensorEntry, plan: Plan, shard: int, dtype: torch.dtype | None) -> torch.Tensor:
        """Executor thread: the tensor for ``entry`` once all its reads have landed, converted to
        ``dtype`` (None: the checkpoint's)."""
        ...

    def shard_done(self) -> torch.cuda.Event | None:
        """Executor thread, after a shard's tensors: what compute must wait for, if anything."""
        ...

    def read_released(self, r: int, read: ReadRange) -> None:
        """Loop thread: every shard read ``r`` serves is applied; its memory may be reused."""
        ...

    def hold_releases(self) -> None:
        """Keep released reads' memory until ``release_held`` (a manifest verifies the bytes)."""
        ...

    def release_held(self) -> None:
        """The files verified: give back what ``hold_releases`` kept."""
        ...

    def file_chunks(self, key: str, header: FileHeader) -> Iterator[memoryview]:
        """The whole landed file ``key`` (header bytes included), in order, for the manifest's
        digest (any thread but the loop). A chunk is valid until the next one is asked for."""
        ...

    async def settled(self) -> None:
        """Loop thread, after the last read landed: every copy posted for a landed read ran, so
        what ``file_chunks`` hands back is what was fetched."""
        ...

    async def aclose(self) -> None:
        """Free the load's buffers; tensors that view landed bytes keep theirs alive."""
        ...


class _Converted:
    """Byte ranges of tensors that were copied (converted) rather than viewed.

    Only those ranges may be given back once applied: every tensor belongs to one shard, so
    after its conversion nobody needs its source bytes, while bytes that a tensor views, or
    that a shard not yet applied needs, lie outside them.
    """

    def __init__(self, headers: dict[str, FileHeader]) -> None:
        self.spans: dict[str, list[tuple[int, int]]] = {k: [] for k in headers}

    def note(self, entry: TensorEntry, t: torch.Tensor, raw: torch.Tensor) -> None:
        if is_copy(t, raw):
            self.spans[entry.file].append((entry.start, entry.end))

    def within(self, read: ReadRange) -> list[tuple[int, int]]:
        return [
            (max(a, read.start), min(b, read.end))
            for a, b in self.spans[read.file]
            if a < read.end and b > read.start
        ]


def is_copy(t: torch.Tensor, raw: torch.Tensor) -> bool:
    """Whether ``t`` was copied (converted, or cloned for alignment) rather than viewing ``raw``."""
    return t.untyped_storage().data_ptr() != raw.untyped_storage().data_ptr()


class _BufferFill:
    """Landings that hand the backend a buffer to fill."""

    async def buffer_for(self, r: int, read: ReadRange) -> memoryview:
        raise NotImplementedError

    async def fill(self, r: int, read: ReadRange, backend: StorageBackend, version: str | None) -> None:
        buf = await self.buffer_for(r, read)
        await backend.read_into(read.file, read.start, buf, version=version)


class _HostLanding:
    """CPU landings whose tensors view the landed bytes (or copy them when converting)."""

    device = torch.device("cpu")
    slab_bytes: int | None = None  # reads of any size: they land in file-shaped memory
    watches: Sequence[FileWatch] = ()  # mapped files set theirs
    _converted: _Converted

    def _bytes(self, entry: TensorEntry) -> torch.Tensor:
        raise NotImplementedError

    def read_landed(self, r: int, read: ReadRange) -> None:
        return None  # the bytes are already where the tensors will be

    def try_reserve(self, r: int, read: ReadRange) -> bool:
        return True  # file-shaped memory: every read has its place

    async def reserve(self, r: int, read: ReadRange) -> None:
        return None

    # With a manifest, converted spans are released only after verification: released pages
    # of an anonymous arena read back as zeros, and the file would hash wrong.
    _held: list[tuple[int, ReadRange]] | None = None

    def hold_releases(self) -> None:
        self._held = []

    def release_held(self) -> None:
        held, self._held = self._held or [], None
        for r, read in held:
            self._release(r, read)

    def read_released(self, r: int, read: ReadRange) -> None:
        if self._held is not None:
            self._held.append((r, read))
        else:
            self._release(r, read)

    def _release(self, r: int, read: ReadRange) -> None:
        raise NotImplementedError

    def make_tensor(self, entry: TensorEntry, plan: Plan, shard: int, dtype: torch.dtype | None) -> torch.Tensor:
        raw = self._bytes(entry)
        t = tensor_from_bytes(raw, entry, dtype=dtype, device=self.device)
        self._converted.note(entry, t, raw)
        return t

    def shard_done(self) -> None:
        return None

    def file_bytes(self, key: str, header: FileHeader) -> memoryview:
        raise NotImplementedError

    def file_chunks(self, key: str, header: FileHeader) -> Iterator[memoryview]:
        yield self.file_bytes(key, header)  # already in host memory: hashed in place

    async def settled(self) -> None:
        return None  # reads land where the tensors view them: nothing is copied after

    async def aclose(self) -> None:
        return None


class MappedLanding(_HostLanding):
    """Local files mapped into memory; a read asks the kernel to populate a range of the
    mapping, so bytes go from disk into page-cache pages that the tensors view directly."""

    def __init__(self, headers: dict[str, FileHeader], backend: MappableFiles) -> None:
        self.backend = backend
        self.maps = {k: backend.map_file(k, h.size) for k, h in headers.items()}
        self.views = {k: _unmapped_aside(m) for k, m in self.maps.items()}
        # Tensors view these files for as long as the model lives: the model checks them.
        self.watches = [backend.watch(k) for k in headers]
        self._converted = _Converted(headers)

    def _bytes(self, entry: TensorEntry) -> torch.Tensor:
        return self.views[entry.file][entry.start : entry.end]

    def file_bytes(self, key: str, header: FileHeader) -> memoryview:
        return memoryview(self.maps[key])

    async def fill(self, r: int, read: ReadRange, backend: StorageBackend, version: str | None) -> None:
        # The mapping's own backend populates it (``backend`` is the same object, typed narrower).
        await self.backend.populate(read.file, self.maps[read.file], read.start, read.nbytes, version=version)

    def _release(self, r: int, read: ReadRange) -> None:
        for lo, hi in self._converted.within(read):
            lo = -(-lo // PAGE) * PAGE
            hi -= hi % PAGE
            if hi > lo:  # unmapped pages stay in the page cache; RSS drops
                self.maps[read.file].madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class ArenaLanding(_HostLanding, _BufferFill):
    """File-shaped anonymous arenas that the backend reads into."""

    def __init__(self, headers: dict[str, FileHeader]) -> None:
        self.arenas = {k: Arena(h.size) for k, h in headers.items()}
        self._converted = _Converted(headers)

    def _bytes(self, entry: TensorEntry) -> torch.Tensor:
        return self.arenas[entry.file].bytes_tensor(entry.start, entry.end)

    async def buffer_for(self, r: int, read: ReadRange) -> memoryview:
        return self.arenas[read.file].buffer(read.start, read.end)

    def file_bytes(self, key: str, header: FileHeader) -> memoryview:
        # Reads start at the tensor data; the header bytes are known from parsing it.
        buf = self.arenas[key].buffer(0, header.size)
        buf[: len(header.raw)] = header.raw
        return buf

    def _release(self, r: int, read: ReadRange) -> None:
        for lo, hi in self._converted.within(read):
            self.arenas[read.file].release(lo, hi)


# -- unmapping off the executor ---------------------------------------------------------------
_unmaps: queue.SimpleQueue[object] = queue.SimpleQueue()
_unmapper: threading.Thread | None = None
_unmapper_lock = threading.Lock()


def _unmapped_aside(m: mmap.mmap) -> torch.Tensor:
    """A uint8 tensor viewing all of ``m``, whose unmapping happens on a thread of its own.

    The model's tensors hold the mapping; the last one goes when the model is unloaded, on the
    executor holding the turn (instance.unload), and the mapping's munmap used to run right
    there: 60-240 ms for gpt2-medium's 1.4 GB of populated pages, measured while every warm
    request waited for the turn (issue 28 item 4). The tensors view ``m`` through a numpy array;
    when that array goes, a finalizer hands ``m`` to the unmapper thread, which drops the last
    reference (munmap releases the GIL).
    """
    arr = np.frombuffer(m, dtype=np.uint8)
    fin = weakref.finalize(arr, _unmap_later, m)
    fin.atexit = False  # at exit the process unmaps everything anyway
    return torch.frombuffer(arr, dtype=torch.uint8)


def _unmap_later(m: object) -> None:
    _unmaps.put(m)
    _ensure_unmapper()


def _ensure_unmapper() -> None:
    """One idle daemon thread, started with the module (and again in a forked child), so that
    a load's first unmap adds no thread to the process."""
    global _unmapper
    with _unmapper_lock:
        if _unmapper is None or not _unmapper.is_alive():
            _unmapper = threading.Thread(target=_unmap_forever, name="cicada-unmap", daemon=True)
            _unmapper.start()


def _unmap_forever() -> None:
    while True:
        m: object = _unmaps.get()
        del m  # the last reference: munmap here, off the executor's turn and the loop


_ensure_unmapper()
