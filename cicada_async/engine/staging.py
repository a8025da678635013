"""The staging landing (CUDA, or CPU on request to test that path), and the choice of landing.

Reads land in pinned host slabs, are copied to the device on a dedicated stream and the slab is
reused; the whole model is never staged in host memory, and verification reads the device
buffers back through one bounded host buffer.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from protocols.errors import StorageError
from protocols.manifest import FileHeader, Plan, ReadRange, TensorEntry
from protocols.storage import FileWatch, MappableFiles

from cicada_async.engine.landing import ArenaLanding, Landing, MappedLanding, _BufferFill, is_copy
from cicada_async.engine.reads import MAX_GAP_BYTES
from cicada_async.engine.slabs import SHELF, slab_pool
from cicada_async.engine.tensorbytes import tensor_from_bytes

HASH_CHUNK_BYTES = 8 << 20
"""Verification reads a device file back in pieces of this size (one host buffer per file)."""



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
        converting: bool = False,
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
        # A converting load (a serving dtype asked) lands each read in a device buffer of its
        # own, freed once every tensor it holds bytes of was made; file-shaped buffers
        # allocated up front and freed at the end held the raw checkpoint beside its converted
        # copy (peak raw + converted: 1.5x the checkpoint for fp32 served as bf16, 3x for bf16
        # as fp32; review-3 G-2). Freed by what was made, not by the fetch's release: a read
        # that landed before the plan serves no shard yet, and its bytes are still needed.
        # Otherwise the tensors view file-shaped buffers, with no copy at all.
        self.converting = converting
        self.device_reads: dict[int, tuple[ReadRange, torch.Tensor]] = {}
        self._entries = {k: sorted(h.tensors.values(), key=lambda e: e.start) for k, h in headers.items()}
        self._starts = {k: [e.start for e in v] for k, v in self._entries.items()}
        self._unmade: dict[int, set[str]] = {}  # read -> tensors with bytes in it not yet made
        self._made: set[str] = set()
        self._lock = threading.Lock()  # _copy and make_tensor run on any executor worker
        self._hold = False  # a manifest hashes the raw bytes: keep every read until verified
        self.device_files = {} if converting else {
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
        # Set at aclose: a copy posted before it that runs later must not allocate a device
        # buffer nobody frees, nor start a poller that outlives the landing (review-3 G-9).
        self._closed = False
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
        self.post(lambda: self._copy(r, read, slab))

    def _copy(self, r: int, read: ReadRange, slab: torch.Tensor) -> None:  # executor thread
        try:
            if self._closed and self.converting:
                # The load ended before this copy ran: aclose dropped device_reads, so no tensor
                # can be made from it, and its device buffer would be held by nobody's count.
                # (A file-shaped buffer is still written: tensors may view it.)
                return
            if self.converting:
                # On the copy stream: the allocator then reuses the block, once freed, only for
                # work queued on that stream after the conversions that read it.
                with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                    dst = torch.empty(read.nbytes, dtype=torch.uint8, device=self.device)
                with self._lock:
                    self.device_reads[r] = (read, dst)
                    self._unmade[r] = {e.name for e in self._overlapping(read.file, read.start, read.end)} - self._made
            else:
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
        if self._closed:
            return  # aclose synchronized the stream; the slabs' fate is decided there
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

    def _overlapping(self, key: str, start: int, end: int) -> list[TensorEntry]:
        entries = self._entries[key]
        i = max(bisect.bisect_right(self._starts[key], start) - 1, 0)
        out = []
        while i < len(entries) and entries[i].start < end:
            if entries[i].end > start:
                out.append(entries[i])
            i += 1
        return out

    def _made_from(self, entry: TensorEntry, reads: list[int]) -> None:
        """``entry`` was made: reads with no tensor left to make give their buffer back."""
        with self._lock:
            self._made.add(entry.name)
            for r in reads:
                left = self._unmade.get(r)
                if left is not None:
                    left.discard(entry.name)
                    if not left and not self._hold:
                        del self._unmade[r]
                        self.device_reads.pop(r, None)

    def _entry_bytes(self, entry: TensorEntry) -> tuple[torch.Tensor, bool, list[int]]:
        """The entry's raw bytes on the device, whether they are a buffer of their own, and the
        reads they came from."""
        if not self.converting:
            return self.device_files[entry.file][entry.start : entry.end], False, []
        with self._lock:
            found = [
                (r, p) for r, p in self.device_reads.items()
                if p[0].file == entry.file and p[0].start < entry.end and p[0].end > entry.start
            ]
        reads = [r for r, _ in found]
        pieces = sorted((p for _, p in found), key=lambda p: p[0].start)
        for read, buf in pieces:
            if read.start <= entry.start and entry.end <= read.end:  # one read holds it all
                return buf[entry.start - read.start : entry.end - read.start], False, reads
        # A tensor larger than a read: assembled from its reads' buffers (device to device).
        out = torch.empty(entry.nbytes, dtype=torch.uint8, device=self.device)
        pos = entry.start
        for read, buf in pieces:
            if read.start > pos:
                break
            hi = min(read.end, entry.end)
            if hi > pos:
                out[pos - entry.start : hi - entry.start].copy_(buf[pos - read.start : hi - read.start])
                pos = hi
        if pos != entry.end:
            raise RuntimeError(f"{entry.name}: bytes [{pos}, {entry.end}) of {entry.file} are in no landed read")
        return out, True, reads

    def make_tensor(self, entry: TensorEntry, plan: Plan, shard: int, dtype: torch.dtype | None) -> torch.Tensor:
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            raw, own, reads = self._entry_bytes(entry)
            t = tensor_from_bytes(raw, entry, dtype=dtype, device=self.device)
            if dtype is not None and not own and not is_copy(t, raw):
                # A converting load frees the raw buffers: a tensor left in its file dtype
                # (integers, fp32-kept modules) must not pin a whole file or read.
                t = t.clone()
            self._converting |= dtype is not None
            if self.converting:
                del raw
                self._made_from(entry, reads)
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
        # Slabs were recycled after their copy; a converting load's read buffers go when the
        # tensors they hold bytes of were made (make_tensor), not on the fetch's release.
        return None

    def hold_releases(self) -> None:
        # File-shaped buffers stay until aclose anyway; per-read buffers stay until verified.
        self._hold = True

    def release_held(self) -> None:
        with self._lock:
            self._hold = False
            for r in [r for r, left in self._unmade.items() if not left]:
                del self._unmade[r]
                self.device_reads.pop(r, None)

    def file_chunks(self, key: str, header: FileHeader) -> Iterator[memoryview]:
        """The landed file, for verification, once ``settled``: read back from the device in
        pieces through one host buffer (pinned on CUDA), not copied whole to pageable memory.

        Hashing after the copy costs one device-to-host pass; the slabs are recycled as soon
        as their copy ran, so they cannot be hashed in file order while the load goes on.
        """
        if self.stream is not None:
            self.stream.synchronize()  # every copy was enqueued (settled): wait for them
        if self.converting:
            yield from self._read_chunks(key, header)
            return
        src = self.device_files[key]
        head = header.raw
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

    def _read_chunks(self, key: str, header: FileHeader) -> Iterator[memoryview]:
        """A converting load's file, from its held per-read buffers in file order."""
        yield memoryview(header.raw)
        pos = len(header.raw)
        for read, buf in sorted((p for p in self.device_reads.values() if p[0].file == key), key=lambda p: p[0].start):
            if read.start > pos:
                break  # a hole: reported below, since the digest cannot be right
            for lo in range(max(pos, read.start), read.end, HASH_CHUNK_BYTES):
                hi = min(lo + HASH_CHUNK_BYTES, read.end)
                piece = buf[lo - read.start : hi - read.start]
                host = piece if not self.cuda else piece.to("cpu")
                yield host.numpy().data.cast("B")
            pos = max(pos, read.end)
        if pos != header.size:
            raise StorageError(f"{key}: bytes [{pos}, {header.size}) never landed, so the file cannot be verified")

    async def aclose(self) -> None:
        self._closed = True
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
        self.device_reads.clear()
        self._unmade.clear()


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
    converting: bool = False,
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
    return StagingLanding(
        headers, device, slab_bytes=slab, pool_bytes=pool_bytes, post=post, loop=loop, converting=converting
    )
