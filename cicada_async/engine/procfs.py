"""One number from a ``/proc`` file: the kB field that memory figures come from."""

from __future__ import annotations


def kib_field(path: str, key: bytes) -> int | None:
    """Bytes of the ``key: N kB`` line of ``path`` (/proc/self/status, /proc/meminfo), None
    where the file or the line is missing. Standard library only: the prefetch calls it before
    torch is imported."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
