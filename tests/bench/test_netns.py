"""A kernel-shaped link moves bytes at its tc rate, and leaves nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from cicada_async.bench import netns

SIZE = 64 << 20
_WHY = netns.available()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

# A server inside the namespace: one connection, SIZE bytes, then close.
_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0)); s.listen(1); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytes(1 << 20)
for _ in range(int(sys.argv[2]) >> 20): c.sendall(buf)
c.close()
"""


def _receive(link: netns.ShapedLink) -> float:
    proc = link.popen([sys.executable, "-c", _SERVER, link.origin_ip, str(SIZE)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    buf = bytearray(4 << 20)
    got = 0
    with socket.create_connection((link.origin_ip, port), timeout=30) as c:
        t0 = time.perf_counter()
        while (n := c.recv_into(buf)) > 0:
            got += n
        elapsed = time.perf_counter() - t0
    assert got == SIZE
    return SIZE * 8 / elapsed


def _gone(link: netns.ShapedLink) -> bool:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return link.ns not in netns.namespaces() and link.host_dev not in links


@pytest.mark.parametrize("gbit", [1, 4])
def test_shaped_link_runs_at_its_rate_and_is_removed(gbit: int) -> None:
    with netns.ShapedLink(gbit * 1e9) as link:
        rate = _receive(link)
        assert link.ns in netns.namespaces()
    assert 0.75 * gbit * 1e9 <= rate <= 1.25 * gbit * 1e9, f"measured {rate / 1e9:.3f} Gbit/s on {gbit} Gbit/s"
    assert _gone(link)


def test_link_is_removed_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with netns.ShapedLink(4e9) as link:
            link.popen(["sleep", "30"])
            raise RuntimeError("boom")
    assert _gone(link)
