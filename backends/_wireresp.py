"""One HTTP/1.1 answer on a blocking socket: its status, headers and body framing.

The body is received with ``recv_into`` straight into the caller's view; only the few body
bytes that arrived together with the headers are copied (see ``backends._wire``).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from multidict import CIMultiDict

from backends._remote import Transient

DRAIN_MAX = 64 << 10  # a redirect or error body up to this size is read to keep the connection
# A body recv wakes only once this much has arrived (or the body's end, or EOF): from a slow or
# bursty origin each wake-up then moves 128 KiB instead of a packet's worth, which is where the
# CPU of a receive loop goes. It also means read_timeout_s bounds the wait for 128 KiB.
LOWAT = 128 << 10
_HAS_LOWAT = hasattr(socket, "SO_RCVLOWAT")


@dataclass(eq=False)  # hashed by identity: kept in sets of busy connections
class Conn:
    sock: socket.socket
    origin: tuple[str, str, int]
    reused: bool = False
    lowat: int = 1  # the socket's SO_RCVLOWAT

    def set_lowat(self, n: int) -> None:
        if n != self.lowat and _HAS_LOWAT and not isinstance(self.sock, ssl.SSLSocket):
            # Not under TLS: the kernel counts ciphertext, and SSL may hold decrypted bytes.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self.lowat = n


@dataclass
class Response:
    """Status and headers of one answer; its body is read with ``readinto``."""

    status: int
    headers: CIMultiDict[str]
    url: str
    _conn: Conn | None
    _put: Callable[[Conn, bool], None]  # the pool's: keep the connection (True) or close it
    _pending: memoryview  # body bytes that arrived with the headers
    _left: int | None = None  # Content-Length bytes still to come; None: chunked or to EOF
    _chunked: bool = False
    _chunk_left: int = 0
    _done: bool = False
    _keep: bool = True
    _scratch: bytearray = field(default_factory=bytearray)

    def _recv(self, view: memoryview) -> int:
        """Into ``view`` from the pending bytes first, then the socket; 0 at EOF."""
        if self._pending:
            n = min(len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        assert self._conn is not None
        try:
            # Only with a known length: never ask the kernel to wait for more than will come.
            self._conn.set_lowat(min(len(view), LOWAT) if self._left is not None else 1)
            return self._conn.sock.recv_into(view)
        except TimeoutError as e:
            raise Transient(f"no body bytes for {self._conn.sock.gettimeout()}s", timeout=True) from e
        except OSError as e:
            raise Transient(f"body broke off: {type(e).__name__}: {e}") from e

    def _line(self) -> bytes:
        """One CRLF-terminated line of chunked framing (short; copied byte-wise is fine)."""
        out = bytearray()
        one = memoryview(bytearray(1))
        while not out.endswith(b"\r\n"):
            if len(out) > 4096 or not self._recv(one):
                raise Transient("chunked body broke off in its framing", short=True)
            out += one
        return bytes(out[:-2])

    def readinto(self, view: memoryview) -> int:
        """Body bytes into ``view``; 0 once the body is complete. A body that ends early
        raises Transient(short=True): never a silent short return."""
        if self._done or not len(view):
            return 0
        if self._chunked:
            if self._chunk_left == 0:
                try:
                    size = int(self._line().split(b";")[0].strip(), 16)
                except ValueError:
                    raise Transient("chunked body: a chunk size that is not hex", short=True) from None
                if size == 0:
                    while self._line():  # trailers, then the empty line
                        pass
                    self._done = True
                    return 0
                self._chunk_left = size
            n = self._recv(view[: self._chunk_left])
            if n == 0:
                raise Transient("connection closed inside a chunk")
            self._chunk_left -= n
            if self._chunk_left == 0 and self._line() != b"":
                raise Transient("chunked body framing is broken", short=True)
            return n
        if self._left is not None:
            view = view[: self._left]
        n = self._recv(view)
        if n == 0:
            if self._left is not None:
                # The connection went away inside the body it announced: a drop, not a short
                # body (which is one whose announced length is less than the range asked).
                raise Transient(f"connection closed with {self._left} body bytes to come")
            self._done, self._keep = True, False  # framed by the connection's end
            return 0
        if self._left is not None:
            self._left -= n
            self._done = self._left == 0
        return n

    def skip(self, n: int, scratch: memoryview | None = None) -> None:
        """Discard ``n`` body bytes (an origin that ignored Range sends them from byte 0)."""
        if scratch is None or len(scratch) < (64 << 10):
            if not self._scratch:
                self._scratch = bytearray(1 << 20)
            scratch = memoryview(self._scratch)
        while n:
            got = self.readinto(scratch[: min(n, len(scratch))])
            if got == 0:
                raise Transient(f"body ended {n} bytes before the range began", short=True)
            n -= got

    def read_small(self, limit: int = DRAIN_MAX) -> bytes:
        """A short body (an error document), at most ``limit`` bytes; the rest is dropped."""
        out = bytearray()
        buf = memoryview(bytearray(16 << 10))
        try:
            while len(out) < limit:
                n = self.readinto(buf)
                if n == 0:
                    break
                out += buf[:n]
        except Transient:
            self._keep = False
        return bytes(out[:limit])

    def release(self) -> None:
        """Done with this answer: the connection goes back to the pool if its body was read
        to the end and the origin keeps it alive, else it is closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.set_lowat(1)  # the next answer's headers must not wait for 128 KiB
            except OSError:
                self._keep = False
            self._put(conn, self._done and self._keep and not self._pending)
