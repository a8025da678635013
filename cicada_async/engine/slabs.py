"""Host slabs that staging loads land reads in: their size and count, and the process-wide shelf
that keeps them between loads."""

from __future__ import annotations

import threading

import torch

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
