"""File-shaped, page-aligned host buffers that weight bytes land in and tensors view."""

from __future__ import annotations

import mmap

import torch

PAGE = mmap.PAGESIZE


class Arena:
    """Anonymous memory laid out like one weight file: file offset X lives at arena offset X.

    Reads land where the tensors will live, so a tensor is a view (no copy) and direct I/O can
    target page-aligned addresses. Huge pages halve the cost of first-touch page faults.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._len = max(PAGE, -(-size // PAGE) * PAGE)
        self._map = mmap.mmap(-1, self._len, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # kernels without THP
                pass
        self._view = memoryview(self._map)
        # torch keeps a reference to the mmap, so the memory lives as long as any tensor view.
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=self._len)

    def buffer(self, start: int, end: int) -> memoryview:
        """A writable window for bytes [start, end) of the file."""
        return self._view[start:end]

    def bytes_tensor(self, start: int, end: int) -> torch.Tensor:
        return self.tensor[start:end]

    def release(self, start: int, end: int) -> None:
        """Give back the whole pages inside [start, end) once nothing views them any more."""
        lo = -(-start // PAGE) * PAGE
        hi = (end // PAGE) * PAGE
        if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
