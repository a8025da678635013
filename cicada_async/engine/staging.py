"""The staging landing (CUDA, or CPU on request to test that path), and the choice of landing.

Reads land in pinned host slabs, are copied to the device on a dedicated stream and the slab is
reused; the whole model is never staged in host memory, and verification reads the device
buffers back through one bounded host buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from protocols.errors import StorageError
from protocols.manifest import FileHeader, Plan, ReadRange, TensorEntry
from protocols.storage import FileWatch, MappableFiles

from cicada_async.engine.landing import ArenaLanding, Landing, MappedLanding, _BufferFill, is_copy
from cicada_async.engine.reads import MAX_GAP_BYTES
from cicada_async.engine.tensorbytes import tensor_from_bytes

HASH_CHUNK_BYTES = 8 << 20
"""Verification reads a device file back in pieces of this size (one host buffer per file)."""

KEEP_SLAB_BYTES = 256 << 20
"""Pinned slabs kept between loads, process-wide; a load takes its slabs from them first."""


def slab_pool(slab_bytes: int, pool_bytes: int, *, pinned: bool) -> tuple[int, int]:
    """(slab size, slab count) for a staging pool of about ``pool_bytes``, at least two slabs.

    torch's pinned host allocator rounds every block up to a power of two: pinned slabs are
    sized so, and counted at that size, so that the pool really stays near ``pool_bytes``.
    """
    if pinned:
        slab_bytes = 1 << max(0, slab_bytes - 1).bit_length()
    return slab_bytes, max(2, pool_bytes // max(slab_bytes, 1))


class SlabShelf:
    """Slabs given back by finished loads, for the next ones: pinning is costly, and torch's
    caching host allocator keeps every pinned block it ever handed out, so slabs allocated per
    load (16 x 16 MiB each) grew pinned memory with every concurrent cold start. At most
    ``keep_bytes`` wait here; a load holds only its own pool while it runs."""

    def __init__(self, keep_bytes: int = KEEP_SLAB_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()  # loads open their landing in worker threads
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}

    def take(self, slab_bytes: int, count: int, *, pinned: bool) -> list[torch.Tensor]:
        with self._lock:
            shelf = self._free.get((slab_bytes, pinned), [])
            got = [shelf.pop() for _ in range(min(count, len(shelf)))]
        while len(got) < count:
            got.append(torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=pinned))
        return got

    def give(self, slabs: list[torch.Tensor], *, pinned: bool) -> None:
        with self._lock:
            for s in slabs:
                if self.held_bytes() + s.numel() > self.keep_bytes:
                    return  # beyond the bound: back to torch
                self._free.setdefault((s.numel(), pinned), []).append(s)

    def held_bytes(self) -> int:
        return sum(s.numel() for shelf in self._free.values() for s in shelf)


SHELF = SlabShelf()


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
        # Pinned memory makes host-to-device copies asynchronous and faster; the slabs come
        # from the process's shelf and go back to it at aclose.
        self._owned = SHELF.take(self.slab_bytes, count, pinned=self.cuda)
        self._free: asyncio.Queue[torch.Tensor] = asyncio.Queue()
        for slab in self._owned:
            self._free.put_nowait(slab)
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
        # Copies posted to the executor and copies that ran (both counted on the loop): the
        # fetch ends when the last read lands, not when its copy ran, and verifying before
        # that hashed buffers the copies had not reached yet (a false IntegrityError).
        self._posted = 0
        self._copied = 0
        self._all_copied: asyncio.Event | None = None

    def try_reserve(self, r: int, read: ReadRange) -> bool:
        self._check(read)
        if r not in self.slabs:
            if self._free.empty():
                return False
            self.slabs[r] = self._free.get_nowait()
        return True

    async def reserve(self, r: int, read: ReadRange) -> None:
        self._check(read)
        if r not in self.slabs:
            self.slabs[r] = await self._free.get()  # a copy of an earlier read frees one

    def _check(self, read: ReadRange) -> None:
        if read.nbytes > self.slab_bytes:
            raise ValueError(f"read of {read.nbytes} bytes exceeds the {self.slab_bytes}-byte slab")

    async def buffer_for(self, r: int, read: ReadRange) -> memoryview:
        await self.reserve(r, read)  # normally done already, before the read slot
        return self.slabs[r].numpy().data.cast("B")[: read.nbytes]

    def read_landed(self, r: int, read: ReadRange) -> None:
        slab = self.slabs.pop(r)
        self._posted += 1
        self.post(lambda: self._copy(read, slab))

    def _copy(self, read: ReadRange, slab: torch.Tensor) -> None:  # executor thread
        try:
            dst = self.device_files[read.file][read.start : read.end]
            if self.stream is None:
                dst.copy_(slab[: read.nbytes])
                self._loop.call_soon_threadsafe(self._free.put_nowait, slab)
                return
            with torch.cuda.stream(self.stream):
                dst.copy_(slab[: read.nbytes], non_blocking=True)
                # Blocking: a host wait on it sleeps instead of spinning a core (_recycle).
                ev = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]  # unannotated in torch itself
                ev.record(self.stream)
            self._loop.call_soon_threadsafe(self._recycle_after, ev, slab)
        finally:
            # Enqueued on the stream (CUDA) or done (CPU): file_chunks synchronizes the stream.
            self._loop.call_soon_threadsafe(self._copy_ran)

    def _copy_ran(self) -> None:  # loop thread
        self._copied += 1
        if self._all_copied is not None and self._copied >= self._posted:
            self._all_copied.set()

    async def settled(self) -> None:
        while self._copied < self._posted:
            self._all_copied = asyncio.Event()
            await self._all_copied.wait()

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

    def file_chunks(self, key: str, header: FileHeader) -> Iterator[memoryview]:
        """The landed file, for verification, once ``settled``: read back from the device in
        pieces through one host buffer (pinned on CUDA), not copied whole to pageable memory.

        Hashing after the copy costs one device-to-host pass; the slabs are recycled as soon
        as their copy ran, so they cannot be hashed in file order while the load goes on.
        """
        src = self.device_files[key]
        head = header.raw
        if self.stream is not None:
            self.stream.synchronize()  # every copy was enqueued (settled): wait for them
        bounce = None
        if self.cuda:
            bounce = torch.empty(min(HASH_CHUNK_BYTES, max(src.numel(), 1)), dtype=torch.uint8, pin_memory=True)
        for lo in range(0, src.numel(), HASH_CHUNK_BYTES):
            hi = min(lo + HASH_CHUNK_BYTES, src.numel())
            if bounce is None:
                host = src[lo:hi].clone() if lo < len(head) else src[lo:hi]
            else:
                host = bounce[: hi - lo]
                host.copy_(src[lo:hi])  # synchronous: the buffer is reused for the next piece
            view = host.numpy().data.cast("B")
            if lo < len(head):  # reads start at the tensor data; the header bytes are known
                n = min(hi, len(head)) - lo
                view[:n] = head[lo : lo + n]
            yield view

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self.stream is not None:
            await asyncio.to_thread(self.stream.synchronize)  # not on the loop: it blocks
        # The slabs are only for landing; the tensors view device_files. Every copy ran (the
        # stream is idle), so they go back to the shelf for the next load.
        self._free = asyncio.Queue()
        self.slabs.clear()
        self._pending.clear()
        owned, self._owned = self._owned, []
        if self._copied >= self._posted:  # a copy still posted would write a reused slab
            SHELF.give(owned, pinned=self.cuda)
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
