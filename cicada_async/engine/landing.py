"""Where fetched bytes land and how they become tensors: one strategy per target device.

- ``ArenaLanding`` (CPU): file-shaped arenas; a tensor is a view of the bytes it landed in.
- ``StagingLanding`` (CUDA): a bounded pool of pinned host slabs, reused; each shard's bytes
  are copied host-to-device on a dedicated stream, and an event per shard lets compute wait
  for its own copies only. The whole model is never staged in host memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import Callable, Sequence
from typing import Protocol

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

    async def fill(self, r: int, read: ReadRange, backend: StorageBackend, version: str | None) -> None:
        """Fetch read ``r``'s bytes from ``backend`` to where they land."""
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

    def file_bytes(self, key: str, header: FileHeader) -> memoryview:
        """The whole landed file ``key`` (header bytes included), for the manifest's digest."""
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

    async def aclose(self) -> None:
        return None


class MappedLanding(_HostLanding):
    """Local files mapped into memory; a read asks the kernel to populate a range of the
    mapping, so bytes go from disk into page-cache pages that the tensors view directly."""

    def __init__(self, headers: dict[str, FileHeader], backend: MappableFiles) -> None:
        self.backend = backend
        self.maps = {k: backend.map_file(k, h.size) for k, h in headers.items()}
        self.views = {k: torch.frombuffer(m, dtype=torch.uint8) for k, m in self.maps.items()}
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


def slab_pool(slab_bytes: int, pool_bytes: int, *, pinned: bool) -> tuple[int, int]:
    """(slab size, slab count) for a staging pool of about ``pool_bytes``, at least two slabs.

    torch's pinned host allocator rounds every block up to a power of two: pinned slabs are
    sized so, and counted at that size, so that the pool really stays near ``pool_bytes``.
    """
    if pinned:
        slab_bytes = 1 << max(0, slab_bytes - 1).bit_length()
    return slab_bytes, max(2, pool_bytes // max(slab_bytes, 1))


class StagingLanding(_BufferFill):
    """Reads land in a bounded pool of reused host slabs and are copied to the device at once.

    Each landed read is copied into a file-shaped buffer on the device on a dedicated stream
    (posted to the executor thread, the GPU thread), and its slab goes back to the pool as soon
    as that copy has run. A shard's tensors are views of the device buffer; the event recorded
    after them is what the module's compute waits for (on the device, not on the host).
    """

    def __init__(
        self,
        headers: dict[str, FileHeader],
        device: torch.device,
        *,
        slab_bytes: int,
        pool_bytes: int,
        post: Callable[[Callable[[], None]], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # Built off the event loop (pinned allocation and device buffers take milliseconds to
        # seconds); the loop is the one that will run the fetch.
        self.device = device
        self.cuda = device.type == "cuda"
        self.post = post
        self.slab_bytes, count = slab_pool(slab_bytes, pool_bytes, pinned=self.cuda)
        # Pinned memory makes host-to-device copies asynchronous and faster; pinning is costly,
        # so the slabs are allocated once per load and reused (and torch's host allocator keeps
        # the pinned blocks for the next load).
        self._free: asyncio.Queue[torch.Tensor] = asyncio.Queue()
        for _ in range(count):
            self._free.put_nowait(torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=self.cuda))
        self.slabs: dict[int, torch.Tensor] = {}
        self.device_files = {
            k: torch.empty(h.size, dtype=torch.uint8, device=device) for k, h in headers.items()
        }
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None  # type: ignore[no-untyped-call]  # unannotated in torch itself
        if self.stream is not None:
            # device_files came from the allocating stream's pool, possibly a block whose last
            # kernels (another model's forward) are still queued: copies wait for them.
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self._pending: list[tuple[torch.cuda.Event, torch.Tensor]] = []
        self._converting = False  # a serving dtype was asked: no tensor views device_files
        self._poller: asyncio.Task[None] | None = None
        self._loop = loop or asyncio.get_running_loop()

    async def buffer_for(self, r: int, read: ReadRange) -> memoryview:
        if read.nbytes > self.slab_bytes:
            raise ValueError(f"read of {read.nbytes} bytes exceeds the {self.slab_bytes}-byte slab")
        slab = await self._free.get()
        self.slabs[r] = slab
        return slab.numpy().data.cast("B")[: read.nbytes]

    def read_landed(self, r: int, read: ReadRange) -> None:
        slab = self.slabs.pop(r)
        self.post(lambda: self._copy(read, slab))

    def _copy(self, read: ReadRange, slab: torch.Tensor) -> None:  # executor thread
        dst = self.device_files[read.file][read.start : read.end]
        if self.stream is None:
            dst.copy_(slab[: read.nbytes])
            self._loop.call_soon_threadsafe(self._free.put_nowait, slab)
            return
        with torch.cuda.stream(self.stream):
            dst.copy_(slab[: read.nbytes], non_blocking=True)
            ev = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch itself
            ev.record(self.stream)
        self._loop.call_soon_threadsafe(self._recycle_after, ev, slab)

    def _recycle_after(self, ev: torch.cuda.Event, slab: torch.Tensor) -> None:
        self._pending.append((ev, slab))
        if self._poller is None or self._poller.done():
            self._poller = self._loop.create_task(self._recycle())

    async def _recycle(self) -> None:
        # The copies run in order on one stream, so the oldest event completes first. It is
        # waited for in a worker thread (CUDA releases the GIL while it blocks), not polled on
        # the loop, which took the GIL every half millisecond from the thread launching kernels.
        while self._pending:
            ev, slab = self._pending[0]
            if not ev.query():  # type: ignore[no-untyped-call]  # unannotated in torch itself
                await asyncio.to_thread(ev.synchronize)
            self._pending.pop(0)
            self._free.put_nowait(slab)

    def make_tensor(self, entry: TensorEntry, plan: Plan, shard: int, dtype: torch.dtype | None) -> torch.Tensor:
        raw = self.device_files[entry.file][entry.start : entry.end]
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            t = tensor_from_bytes(raw, entry, dtype=dtype, device=self.device)
            if dtype is not None and not is_copy(t, raw):
                # A converting load frees the raw file buffers after it (aclose): a tensor left
                # in its file dtype (integers, fp32-kept modules) must not pin a whole file.
                t = t.clone()
            self._converting |= dtype is not None
        if self.stream is None:
            return t
        if is_copy(t, raw):
            # A conversion or clone allocated on the copy stream; the forward uses it on the
            # compute stream, which the allocator must know of before reusing the block.
            t.record_stream(torch.cuda.current_stream(self.device))
        return t

    def shard_done(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        ev = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch itself
        ev.record(self.stream)
        return ev

    watches: Sequence[FileWatch] = ()  # tensors view device memory, not files

    def read_released(self, r: int, read: ReadRange) -> None:
        return None  # slabs were recycled after their copy

    # Nothing to hold: verification reads the device buffers back, which stay until aclose.
    def hold_releases(self) -> None:
        return None

    release_held = hold_releases

    def file_bytes(self, key: str, header: FileHeader) -> memoryview:
        """The landed file, for verification: read back from the device once its copies ran.

        Hashing after the copy costs one device-to-host pass; the slabs are recycled as soon
        as their copy ran, so they cannot be hashed in file order while the load goes on.
        """
        if self.stream is not None:
            self.stream.synchronize()
        host = self.device_files[key].cpu()
        view = host.numpy().data.cast("B")
        view[: len(header.raw)] = header.raw
        return view

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self.stream is not None:
            await asyncio.to_thread(self.stream.synchronize)  # not on the loop: it blocks
        # The slabs are only for landing; the tensors view device_files. Pinned memory goes
        # back now instead of living as long as the load's job.
        self._free = asyncio.Queue()
        self.slabs.clear()
        self._pending.clear()
        if self._converting:
            self.device_files = {}  # every tensor was copied out: the raw bytes go now


def landing_for(
    headers: dict[str, FileHeader],
    device: torch.device,
    *,
    read_bytes: int,
    alignment: int,
    pool_bytes: int,
    post: Callable[[Callable[[], None]], None],
    staging: bool = False,
    mapped_backend: MappableFiles | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> Landing:
    """Arenas for the CPU; pinned staging slabs for CUDA (or on request, to test that path)."""
    if device.type == "cpu" and not staging:
        if mapped_backend is not None:
            try:
                return MappedLanding(headers, mapped_backend)
            except (StorageError, OSError):
                pass  # no populate support, or a file system that cannot map: read into arenas
        return ArenaLanding(headers)
    # A read is at most 1.25 read sizes (no runt pieces) plus alignment at both ends.
    slab = read_bytes + read_bytes // 4 + 2 * alignment + MAX_GAP_BYTES
    return StagingLanding(headers, device, slab_bytes=slab, pool_bytes=pool_bytes, post=post, loop=loop)
