"""What the kernel says of this process: a ``/proc`` kB field (memory figures), the usable cores.

Standard library only: the prefetch calls it before torch is imported.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def forward_threads() -> int:
    """Torch's intra-op threads for every forward (``cicada serve`` with ``torch_threads``
    unset): every usable core, while loads fetch too.

    One count for every forward of a model, because a reduction is split by the thread count:
    a cold forward on cores - 1 (the free core was once kept for the event loop and the
    receiving threads while fetching) answered differently from a warm one on every core, and
    from the plain PyTorch load (RoBERTa by 1e-7, ResNet's convolutions by 9e-8). The fetch
    threads spend their time in ``recv_into`` with the GIL released and need little CPU.
    """
    return usable_cores()


def threads_while_fetching() -> int:
    """The same as ``forward_threads`` (the name its callers knew): no core is kept back."""
    return forward_threads()


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
