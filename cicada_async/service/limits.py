"""Bounds every transport shares: the body budget, and the size above which codecs leave the loop."""

from __future__ import annotations

# Decoding/encoding big bodies (numpy parsing of long JSON lists, protobuf parsing) would stall
# the loop: above this many bytes it happens on a worker thread.
OFFLOAD_BYTES = 256 * 1024


class BodyBudget:
    """Bytes of infer bodies the server holds at once (reading, queued or running).

    Reservations are made before bytes are read, so a flood of large bodies is refused
    without being buffered. HTTP and gRPC bodies share one budget. Loop-only state: no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def try_reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.refused += 1
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
