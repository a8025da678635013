"""The threaded client's HTTP/1.1 rules against raw-socket origins (RFC 9110/9112): interim
answers are skipped, a Content-Length must be one plain number, and a redirect neither carries
the caller's headers to another origin nor downgrades https to http."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from backends import open_backend
from backends._wire import WirePool
from protocols.errors import StorageError
from tests.storage.scripted import BIG, DATA, FAST, answer, read_all, scripted, self_signed  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("split", [False, True], ids=["same packet", "own packet"])
async def test_interim_answers_are_skipped(scripted: Any, split: bool) -> None:
    """A 103 Early Hints (and a 100 Continue) before every 206 is not the answer: the 206
    behind it is, and no connection is pooled with it unread (or the next GET would read it)."""

    def hints(conn: socket.socket, first: int, last: int) -> None:
        interim = (b"HTTP/1.1 100 Continue\r\n\r\n"
                   b"HTTP/1.1 103 Early Hints\r\nLink: </m/x>; rel=preload\r\n\r\n")
        final = answer(first, last) + DATA[first : last + 1]
        if split:
            conn.sendall(interim)
            time.sleep(0.02)  # the client sees the 1xx alone first
            conn.sendall(final)
        else:
            conn.sendall(interim + final)

    origin = scripted(hints)
    assert await read_all(origin.uri, read_timeout_s=2) == DATA
    assert origin.connections <= FAST["concurrency"] < origin.requests  # kept alive, in step


@pytest.mark.parametrize(
    "lengths",
    [["{n}", "{n}"], ["{n}", "{m}"], ["+{n}"], ["{u}"], ["\x0b{n}"]],
    ids=["duplicate", "conflicting", "plus sign", "underscore", "vertical tab"],
)
async def test_content_length_must_be_one_plain_number(scripted: Any, lengths: list[str]) -> None:
    """RFC 9112 6.3: a repeated or conflicting Content-Length is refused, and so is any value
    but ASCII digits (Python's int() takes '+65536', '65_536' and surrounding whitespace)."""

    def liar(conn: socket.socket, first: int, last: int) -> None:
        n = last - first + 1
        fields = "".join(
            f"Content-Length: {v.format(n=n, m=n + 5, u=f'{n:_}')}\r\n" for v in lengths
        )
        head = (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{len(DATA)}\r\n"
                f"{fields}ETag: \"v1\"\r\n\r\n").encode("latin-1")
        conn.sendall(head + DATA[first : last + 1])

    origin = scripted(liar)
    with pytest.raises(StorageError, match="Content-Length") as caught:
        await read_all(origin.uri, chunk_bytes=len(DATA))
    assert type(caught.value) is StorageError, repr(caught.value)
    assert origin.requests == 1  # a malformed answer is final, not retried


async def test_redirect_to_another_origin_drops_custom_headers(scripted: Any) -> None:
    """Only the request's own headers (Range, If-Match) follow a redirect to another origin;
    the caller's custom ones (API keys, cookies, configured extras) stay with the first."""

    def target(conn: socket.socket, first: int, last: int) -> None:
        conn.sendall(answer(first, last) + DATA[first : last + 1])

    other = scripted(target)

    def redirect(conn: socket.socket, first: int, last: int) -> None:
        where = f"http://127.0.0.1:{other.port}/m/{BIG}"
        conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {where}\r\nContent-Length: 0\r\n\r\n".encode())

    first_origin = scripted(redirect)
    backend = open_backend(first_origin.uri, {
        **FAST, "read_timeout_s": 2, "headers": {"X-Api-Key": "secret-k", "Cookie": "s=secret-c"}})
    buf = bytearray(100)
    try:
        await asyncio.wait_for(backend.read_into(BIG, 7, memoryview(buf), version='"v1"'), 20)
    finally:
        await backend.aclose()
    assert bytes(buf) == DATA[7:107]
    sent_first = first_origin.last_head.lower()
    assert b"x-api-key: secret-k" in sent_first and b"cookie: s=secret-c" in sent_first
    sent_other = other.last_head.lower()
    assert b"secret" not in sent_other, sent_other  # neither the key nor the cookie
    assert b"range: bytes=7-106" in sent_other and b'if-match: "v1"' in sent_other


async def test_redirect_from_https_to_http_is_refused(scripted: Any, tmp_path: Path) -> None:
    cert, tls = self_signed(tmp_path)

    def target(conn: socket.socket, first: int, last: int) -> None:
        conn.sendall(answer(first, last) + DATA[first : last + 1])

    plain = scripted(target)

    def downgrade(conn: socket.socket, first: int, last: int) -> None:
        where = f"http://127.0.0.1:{plain.port}/m/{BIG}"
        conn.sendall(f"HTTP/1.1 301 Moved\r\nLocation: {where}\r\nContent-Length: 0\r\n\r\n".encode())

    secure = scripted(downgrade, tls)
    pool = WirePool(connect_timeout_s=2, read_timeout_s=2, max_idle=2, cafile=str(cert))
    try:
        with pytest.raises(StorageError, match="https"):
            await asyncio.to_thread(pool.get, f"{secure.uri}{BIG}", {"Range": "bytes=0-9"},
                                    max_redirects=2)
    finally:
        pool.close()
    assert secure.requests == 1  # the TLS origin was reached and answered
    assert plain.connections == 0  # and nothing went out in clear text


@pytest.mark.parametrize("call", ["HEAD (stat)", "GET on the loop path"])
async def test_aiohttp_path_redirect_drops_custom_headers(scripted: Any, call: str) -> None:
    """HEAD (always on aiohttp) and the loop data path follow the same policy as the threaded
    client; aiohttp's own redirects drop only Authorization."""

    def target(conn: socket.socket, first: int, last: int) -> None:
        if first == last == 0:  # the HEAD: no Range
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\nETag: \"v1\"\r\n\r\n".encode())
        else:
            conn.sendall(answer(first, last) + DATA[first : last + 1])

    other = scripted(target)

    def redirect(conn: socket.socket, first: int, last: int) -> None:
        where = f"http://127.0.0.1:{other.port}/m/{BIG}"
        conn.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {where}\r\nContent-Length: 0\r\n\r\n".encode())

    first_origin = scripted(redirect)
    backend = open_backend(first_origin.uri, {
        **FAST, "read_timeout_s": 2, "data_path": "loop",
        "headers": {"X-Api-Key": "secret-k", "Authorization": "Bearer secret-t"}})
    try:
        if call.startswith("HEAD"):
            info = await asyncio.wait_for(backend.stat(BIG), 20)
            assert info.size == len(DATA)
        else:
            buf = bytearray(100)
            await asyncio.wait_for(backend.read_into(BIG, 7, memoryview(buf)), 20)
            assert bytes(buf) == DATA[7:107]
    finally:
        await backend.aclose()
    assert b"x-api-key: secret-k" in first_origin.last_head.lower()
    assert b"secret" not in other.last_head.lower(), other.last_head
