"""A raw-socket HTTP origin whose answers a test writes byte by byte, for the threaded byte
path's tests (test_wire, test_wire_rfc): liars no real server would be."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends import open_backend
from tests.fixtures.storage import payload

BIG = "model.safetensors"
DATA = payload(300_000, 7)
FAST: dict[str, Any] = {
    "chunk_bytes": 64 << 10,
    "concurrency": 2,
    "connect_timeout_s": 2,
    "read_timeout_s": 0.3,
    "max_attempts": 2,
    "resume_attempts": 1,
    "backoff_s": 0.01,
    "backoff_max_s": 0.02,
}

Handler = Callable[[socket.socket, int, int], None]  # (connection, first, last)


class ScriptedOrigin:
    """A raw-socket HTTP origin on 127.0.0.1 whose answers a test writes byte by byte."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests = 0
        self.last_head = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/m/"

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        with conn:
            buf = b""
            try:
                while not self._stop.is_set():
                    while b"\r\n\r\n" not in buf:
                        more = conn.recv(4096)
                        if not more:
                            return
                        buf += more
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    self.requests += 1
                    self.last_head = head
                    rng = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"range:")]
                    first, _, last = rng[0].split(b"=")[1].partition(b"-") if rng else (b"0", b"", b"0")
                    self.handler(conn, int(first), int(last))
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def answer(first: int, last: int, *, length: int | None = None, extra: str = "") -> bytes:
    n = last - first + 1 if length is None else length
    return (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{len(DATA)}\r\n"
            f"Content-Length: {n}\r\nETag: \"v1\"\r\n{extra}\r\n").encode()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedOrigin]]:
    made: list[ScriptedOrigin] = []

    def make(handler: Handler, tls: ssl.SSLContext | None = None) -> ScriptedOrigin:
        made.append(ScriptedOrigin(handler, tls))
        return made[-1]

    yield make
    for origin in made:
        origin.close()


async def read_all(uri: str, n: int = len(DATA), **extra: Any) -> bytes:
    backend = open_backend(uri, {**FAST, **extra})
    try:
        buf = bytearray(n)
        await asyncio.wait_for(backend.read_into(BIG, 0, memoryview(buf)), 20)
        return bytes(buf)
    finally:
        await backend.aclose()


def self_signed(d: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 signed by itself (its file, for a client to trust) and a
    server context holding it, for a TLS scripted origin."""
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    return cert, tls
