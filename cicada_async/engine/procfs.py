"""What the kernel says of this process: a ``/proc`` kB field (memory figures), the usable cores.

Standard library only: the prefetch calls it before torch is imported.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_while_fetching() -> int:
    """Torch's intra-op threads by default while loads fetch (``cicada serve``): every usable
    core but one, kept for the event loop and the receiving threads; a forward widens to every
    core once nothing fetches (``Engine(every_core_when_idle=True)``)."""
    return max(1, usable_cores() - 1)


def kib_field(path: str, key: bytes) -> int | None:
    """Bytes of the ``key: N kB`` line of ``path`` (/proc/self/status, /proc/meminfo), None
    where the file or the line is missing."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
