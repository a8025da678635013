"""A link shaped by the kernel: an origin in a network namespace behind a veth pair.

``with ShapedLink() as link:`` creates namespace ``cic-<id>`` and a veth pair (``cv<id>h`` in
this namespace, ``cv<id>n`` inside it) on a /30 of 10.200.0.0/16 picked from the id; processes
started with ``link.popen(argv)`` run inside the namespace and listen on ``link.origin_ip``.
``link.set_rate(bits_per_s)`` puts a ``tbf`` qdisc on the namespace side's egress (origin to
client: the direction weights travel; requests go up unshaped); ``set_rate(None)`` removes it
(unshaped: veth at the speed the CPUs move it). The kernel shapes, so no relay process spends
the CPU the benchmark measures, as the Python throttling proxy in ``origins.py`` did.

Teardown kills what ``popen`` started (by process id), then deletes the namespace, which
deletes both veth ends; it runs on error too, and ``__enter__`` cleans up a half-built link.
Needs root and ``ip``/``tc`` (iproute2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from cicada_async.bench.origins import stop_process


def available() -> str | None:
    """None when shaped links can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"{tool} (iproute2) not installed"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns unavailable: {r.stderr.strip()}"
    return None


def _run(*argv: str) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class ShapedLink:
    """A namespace for an origin, a veth pair to it, and a tc rate on its downlink."""

    def __init__(self, rate_bps: float | None = None) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.ns = f"cic-{self.id}"
        self.host_dev, self.ns_dev = f"cv{self.id}h", f"cv{self.id}n"
        # A /30 per link from the id, so concurrent links (other engineers' runs) do not clash.
        n = int(self.id[:4], 16) % (1 << 14)
        a, b = 200, n >> 6
        base = (n & 63) * 4
        self.host_ip, self.origin_ip = f"10.{a}.{b}.{base + 1}", f"10.{a}.{b}.{base + 2}"
        self.rate_bps: float | None = None
        self._initial_rate = rate_bps
        self._procs: list[subprocess.Popen[Any]] = []

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ShapedLink:
        try:
            _run("ip", "netns", "add", self.ns)
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
            _run("ip", "link", "set", self.ns_dev, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            self.exec("ip", "addr", "add", f"{self.origin_ip}/30", "dev", self.ns_dev)
            self.exec("ip", "link", "set", self.ns_dev, "up")
            self.exec("ip", "link", "set", "lo", "up")
            self.set_rate(self._initial_rate)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self._procs):
            try:
                stop_process(proc)
            except Exception:  # noqa: BLE001 - keep tearing down the rest
                pass
        self._procs.clear()
        # Deleting the namespace deletes the veth end inside it, and with it the pair; the host
        # end is deleted too in case the move into the namespace never happened.
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True)

    # ------------------------------------------------------------------ use

    def exec(self, *argv: str) -> None:
        _run("ip", "netns", "exec", self.ns, *argv)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; stopped (by pid) when the link closes.

        ``ip netns exec`` execs the command after entering the namespace, so the pid is the
        command's own and stopping it stops the server."""
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)
        self._procs.append(proc)
        return proc

    def set_rate(self, rate_bps: float | None) -> None:
        """Shape the origin's egress with tbf at ``rate_bps`` bits/s, or unshape with None.

        veth sends GSO super-packets of up to 64 KiB, so the bucket must hold several of them
        or tbf drops and TCP backs off below the rate: the burst is 4 ms at the rate (at least
        256 KiB), a 1.5% error at most on the 64 MB transfer the test checks."""
        subprocess.run(["ip", "netns", "exec", self.ns, "tc", "qdisc", "del", "dev", self.ns_dev, "root"],
                       capture_output=True)
        if rate_bps:
            burst = max(256 << 10, int(rate_bps / 8 * 0.004))
            self.exec("tc", "qdisc", "add", "dev", self.ns_dev, "root", "tbf", "rate", f"{int(rate_bps)}bit",
                      "burst", str(burst), "latency", "50ms")
        self.rate_bps = rate_bps

    def url(self, port: int) -> str:
        return f"http://{self.origin_ip}:{port}"


def drop_tree(root: Path) -> int:
    """posix_fadvise(DONTNEED) on every file under ``root`` (an origin's files): pages dropped."""
    n = 0
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)  # dirty pages are not dropped: write back first
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n
