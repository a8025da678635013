"""A small blocking HTTP/1.1 client whose bodies land with ``recv_into``, for worker threads.

Why not aiohttp on the data path: aiohttp reads every body piece into a new ``bytes`` on the
event loop, and the backend then copies it into the landing buffer, so each byte is copied
twice under the GIL. Here a worker thread calls ``sock.recv_into`` on a view of the buffer the
tensor will live in: the kernel copies each byte once, with the GIL released.

Why not urllib3 v2 (measured, ``bench-results/client-cpu-urllib3*.json``, nginx, gpt2, the same
16 x 8 MiB ranged GETs into one buffer): its ``HTTPResponse.readinto`` reads into a new
``bytes`` and copies; its client CPU per GB came out 1.06x and 1.21x ours in two runs (not
decided within the 2-core machine's noise), and it fetched 25-30% slower (0.40-0.43 against
0.56-0.58 GB/s).

Only what ranged GETs need: keep-alive connections pooled per origin, redirects,
Content-Length and chunked framing (RFC 9112: interim 1xx answers skipped, a duplicate or
non-digit Content-Length refused), a timeout on every socket wait, and ``abort`` from another
thread.

What ``abort`` can interrupt: a thread blocked on the request's socket once it is attached
(the TLS handshake, sending, waiting for headers, receiving the body) wakes at once, because
shutting the socket down ends a blocked ``recv_into``/``sendall``/handshake; a TCP connect still
pending (backends._connect, staggered over the host's addresses) sees the abort within 50 ms.
What it cannot: DNS resolution (getaddrinfo, bounded only by the resolver's own timeouts). A
thread in it keeps going until it ends, then sees the abort, so the request is never sent and no
body byte lands (review-3 W-1(3)).
"""

from __future__ import annotations

import base64
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from multidict import CIMultiDict

from backends._connect import Aborted, open_connection

from backends._wireresp import Conn, Response
from protocols.errors import StorageError, StorageTimeout

# Headers are read with recv_into into this buffer; whatever body bytes arrive with them
# (at most this much per response) are the only bytes copied once more, into the caller's view.
_HEAD_BUF = 16 << 10
_MAX_HEAD = 64 << 10
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Interim (1xx) answers skipped before the final one, at most this many per request.
_MAX_INTERIM = 8
# The request's own headers, which follow a redirect to another origin; every other header
# the caller gave (Authorization, API keys, cookies, configured extras) is for the first origin.
CROSS_ORIGIN_HEADERS = frozenset(
    {"range", "if-match", "if-range", "if-none-match", "if-modified-since",
     "if-unmodified-since", "accept", "accept-encoding", "user-agent"}
)
USER_AGENT = "cicada-async-wire/1"  # tells origin logs (and tests) which client sent a GET


class Ticket:
    """One request's handle for ``abort`` from another thread (the event loop on cancel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if sock is not None and self.aborted:
                _shutdown(sock)

    def abort(self) -> None:
        """Shut the request's socket down: a thread blocked on it returns at once."""
        with self._lock:
            self.aborted = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected


class Retryable(Exception):
    """A failure before any response headers (refused, reset, no answer): try again."""

    def __init__(self, error: StorageError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay  # the origin's Retry-After, if it gave one


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent on the request line
    authority: str  # the Host header
    basic_auth: str | None

    @classmethod
    def parse(cls, url: str) -> "Target":
        p = urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise StorageError(f"cannot fetch {url!r}: not an http(s) URL")
        port = p.port or (443 if p.scheme == "https" else 80)
        authority = p.netloc.rpartition("@")[2]
        auth = None
        if p.username is not None:
            raw = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
            auth = "Basic " + base64.b64encode(raw).decode()
        path = (p.path or "/") + (f"?{p.query}" if p.query else "")
        return cls(p.scheme, p.hostname, port, path, authority, auth)

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


class WirePool:
    """Idle keep-alive connections per origin, and the requests that use them.

    ``abort`` may be called from any thread: it shuts the in-flight sockets down, which
    makes their threads' blocking calls return at once.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_idle: int,
        cafile: str | None = None,
        rcvbuf: int | None = None,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_idle = max_idle
        self.rcvbuf = rcvbuf
        self._cafile = cafile
        self._ssl: ssl.SSLContext | None = None  # made on the first https connection
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int], list[Conn]] = {}
        self._busy: set[Conn] = set()
        self._closed = False
        self.opened = 0  # connections made, for tests of reuse

    @property
    def cafile(self) -> str | None:
        return self._cafile

    def trust(self, cafile: str | None) -> None:
        """The CA bundle for https connections made from now on (before the first one)."""
        with self._lock:
            self._cafile, self._ssl = cafile, None

    # ------------------------------------------------------------ connections

    def _connect(self, t: Target, ticket: Ticket) -> Conn:
        try:
            sock = open_connection(t.host, t.port, self.connect_timeout_s, aborted=lambda: ticket.aborted)
        except Aborted as e:
            raise StorageError(f"connecting to {t.host}:{t.port}: aborted") from e
        except TimeoutError as e:
            raise Retryable(StorageTimeout(f"connecting to {t.host}:{t.port} timed out")) from e
        except OSError as e:
            raise Retryable(StorageError(f"connecting to {t.host}:{t.port}: {e}")) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            if t.scheme == "https":
                with self._lock:
                    if self._ssl is None:
                        self._ssl = ssl.create_default_context(cafile=self._cafile)
                    ctx = self._ssl
                sock = ctx.wrap_socket(sock, server_hostname=t.host, do_handshake_on_connect=False)
                ticket.attach(sock)  # an abort shuts it down: the handshake below returns at once
                sock.do_handshake()  # bounded by connect_timeout_s (the socket's timeout)
        except OSError as e:
            sock.close()
            if ticket.aborted:
                raise StorageError(f"TLS to {t.host}:{t.port}: aborted") from e
            raise Retryable(StorageError(f"TLS to {t.host}:{t.port}: {e}")) from e
        sock.settimeout(self.read_timeout_s)
        with self._lock:
            self.opened += 1
        return Conn(sock, t.origin)

    def _get(self, t: Target, ticket: Ticket) -> Conn:
        with self._lock:
            if self._closed:
                raise StorageError("the connection pool is closed")
            idle = self._idle.get(t.origin, [])
            while idle:
                conn = idle.pop()
                # An idle socket that is readable was closed by the origin (or holds junk).
                # poll, not select: a server's descriptors can be numbered past FD_SETSIZE.
                probe = select.poll()
                probe.register(conn.sock, select.POLLIN)
                if probe.poll(0):
                    conn.sock.close()
                    continue
                conn.reused = True
                self._busy.add(conn)
                return conn
        conn = self._connect(t, ticket)
        with self._lock:
            self._busy.add(conn)
        return conn

    def _put(self, conn: Conn, reusable: bool) -> None:
        with self._lock:
            self._busy.discard(conn)
            idle = self._idle.setdefault(conn.origin, [])
            if reusable and not self._closed and len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.sock.close()

    def abort(self) -> None:
        """Wake every in-flight request (from any thread); their threads close the sockets."""
        with self._lock:
            busy = list(self._busy)
        for conn in busy:
            _shutdown(conn.sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for conn in idle:
            conn.sock.close()
        self.abort()

    # ------------------------------------------------------------ requests

    def get(
        self, url: str, headers: Mapping[str, str], *, max_redirects: int, ticket: Ticket | None = None
    ) -> Response:
        """Send a GET and read the answer's headers, following redirects.

        Raises Retryable for failures before headers, StorageError for too many redirects
        or a malformed answer. The caller reads the body and must ``release`` the response.
        """
        origin = Target.parse(url).origin
        for _ in range(max_redirects + 1):
            t = Target.parse(url)
            sent = dict(headers)
            if t.origin != origin:
                # Credentials and custom headers meant for the first origin do not follow a
                # redirect elsewhere; only the request's own (Range, preconditions) do.
                sent = {k: v for k, v in sent.items() if k.lower() in CROSS_ORIGIN_HEADERS}
            resp = self._exchange(t, url, sent, ticket or Ticket())
            location = resp.headers.get("Location")
            if resp.status not in REDIRECTS or not location:
                return resp
            resp.read_small()
            resp.release()
            new_url = urljoin(url, location)
            if t.scheme == "https" and urlsplit(new_url).scheme != "https":
                # A downgrade would send the request (and its Range of a private object) in
                # clear text: refused, not retried.
                raise StorageError(f"GET {url}: refusing a redirect from https to {new_url!r}")
            url = new_url
        raise StorageError(f"GET {url}: too many redirects (more than {max_redirects})")

    def _exchange(self, t: Target, url: str, headers: Mapping[str, str], ticket: Ticket) -> Response:
        lines = [f"GET {t.path} HTTP/1.1", f"Host: {t.authority}"]
        if not any(k.lower() == "user-agent" for k in headers):
            lines.append(f"User-Agent: {USER_AGENT}")
        if t.basic_auth and not any(k.lower() == "authorization" for k in headers):
            lines.append(f"Authorization: {t.basic_auth}")
        for k, v in headers.items():
            if "\r" in k or "\n" in k or "\r" in v or "\n" in v:
                raise StorageError(f"header {k!r} holds a line break")
            lines.append(f"{k}: {v}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for _ in range(2):
            if ticket.aborted:
                raise StorageError(f"GET {url}: aborted")
            conn = self._get(t, ticket)
            ticket.attach(conn.sock)
            try:
                return self._send(conn, t, url, request)
            except _Stale:
                self._put(conn, False)  # the origin closed an idle connection: once more
            except BaseException:
                self._put(conn, False)
                raise
        raise Retryable(StorageError(f"GET {url}: connection closed before any answer"))

    def _send(self, conn: Conn, t: Target, url: str, request: bytes) -> Response:
        what = f"GET {url}"
        buf = bytearray(_HEAD_BUF)
        view = memoryview(buf)
        have = 0
        interim = 0
        deadline = time.monotonic() + self.read_timeout_s
        try:
            conn.sock.sendall(request)
            while True:
                end = buf.find(b"\r\n\r\n", 0, have)
                if end >= 0:
                    if not _interim(buf, end):
                        break
                    # 100 Continue, 103 Early Hints...: not the answer, which follows on the
                    # same connection (RFC 9110 15.2). Dropped, and the wait goes on.
                    interim += 1
                    if interim > _MAX_INTERIM:
                        raise StorageError(f"{what}: more than {_MAX_INTERIM} interim answers")
                    rest = have - (end + 4)
                    buf[:rest] = buf[end + 4 : have]
                    have = rest
                    continue
                if have == len(buf):
                    if len(buf) >= _MAX_HEAD:
                        raise StorageError(f"{what}: response headers over {_MAX_HEAD} bytes")
                    buf.extend(bytes(len(buf)))
                    view = memoryview(buf)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                conn.sock.settimeout(min(self.read_timeout_s, left))
                n = conn.sock.recv_into(view[have:])
                if n == 0:
                    if conn.reused and have == 0:
                        raise _Stale()
                    raise Retryable(StorageError(f"{what}: connection closed before the answer"))
                have += n
        except (TimeoutError, socket.timeout) as e:
            raise Retryable(StorageTimeout(f"{what}: no answer within {self.read_timeout_s}s")) from e
        except OSError as e:  # reset, refused, TLS errors, or a socket shut down by abort
            if conn.reused and have == 0:
                raise _Stale() from e
            raise Retryable(StorageError(f"{what}: {type(e).__name__}: {e}")) from e
        finally:
            conn.sock.settimeout(self.read_timeout_s)
        return self._parse(conn, url, buf, end, have)

    def _parse(self, conn: Conn, url: str, buf: bytearray, end: int, have: int) -> Response:
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise Retryable(StorageError(f"GET {url}: not an HTTP/1.x answer: {head[0][:80]!r}"))
        headers: CIMultiDict[str] = CIMultiDict()
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise Retryable(StorageError(f"GET {url}: malformed header line {line[:80]!r}"))
            headers.add(name.strip(), value.strip(" \t"))  # optional whitespace is SP/HTAB only
        status = int(parts[1])
        if status == 101 or status < 100:
            # Never asked for (no Upgrade is sent): the connection no longer speaks HTTP.
            raise StorageError(f"GET {url}: unexpected status {status}")
        conn_hdr = headers.get("Connection", "").lower()
        keep = "close" not in conn_hdr and (parts[0] != "HTTP/1.0" or "keep-alive" in conn_hdr)
        pending = memoryview(buf)[end + 4 : have]
        resp = Response(status, headers, url, conn, self._put, pending, _keep=keep)
        lengths = headers.getall("Content-Length", [])
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            if lengths:
                # Both framings at once: the mark of response splitting (RFC 9112 6.3).
                raise StorageError(f"GET {url}: both Transfer-Encoding and Content-Length")
            resp._chunked = True
        elif lengths:
            resp._left = _content_length(lengths, url)
            resp._done = resp._left == 0
        elif status in (204, 304):
            resp._done = True
        return resp


def _interim(buf: bytearray, end: int) -> bool:
    """Whether the head ending at ``end`` is an interim answer (1xx other than 101)."""
    code = bytes(buf[: min(end, 16)]).split(b" ", 2)[1:2]
    return bool(code) and len(code[0]) == 3 and code[0].isdigit() and code[0][:1] == b"1" and code[0] != b"101"


def _content_length(values: list[str], url: str) -> int:
    """The one Content-Length: a repeated field, a list ("12, 12") or anything but ASCII
    digits is refused (RFC 9112 6.3; ``int`` would take "+12", "1_2" or other scripts' digits)."""
    if len(values) != 1 or not (values[0].isascii() and values[0].isdigit()):
        raise StorageError(f"GET {url}: bad Content-Length {', '.join(values)!r}")
    return int(values[0])


class _Stale(Exception):
    """A reused keep-alive connection that the origin had closed: retried on a new one."""
