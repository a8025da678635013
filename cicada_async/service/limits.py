"""Bounds every transport shares: the body budget, and the size above which codecs leave the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Decoding/encoding big bodies (numpy parsing of long JSON lists, protobuf parsing) would stall
# the loop: above this many bytes it happens on a worker thread.
OFFLOAD_BYTES = 256 * 1024
# Those threads are the codecs' own, not the loop's default executor: that pool carries a cold
# start's local reads and whole-file hashes (seconds each), and a warm request's decode must not
# queue behind them. Bounded: codecs hold the GIL for much of their work, so more threads would
# not decode faster, and the body budget already bounds the bytes waiting for one.
CODEC_THREADS = 4
_codecs = ThreadPoolExecutor(CODEC_THREADS, thread_name_prefix="cicada-codec")


async def offload_codec(fn: Callable[[], T]) -> T:
    """``fn()`` (a body decode or encode) on the codec threads."""
    return await asyncio.get_running_loop().run_in_executor(_codecs, fn)


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
