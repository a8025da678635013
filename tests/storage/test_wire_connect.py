"""The threaded byte path tries a host's addresses staggered, not one whole timeout after the
other (review-3 W-1(5)): a first address that drops SYNs costs a quarter second, not the
connect timeout, and an address that refuses hands over at once. An abort (a cancelled request)
ends a pending connect or TLS handshake at once, not after the connect timeout (W-1(3)).

The origin is the scripted one on 127.0.0.1; the resolver's answer for a test name lists a
black hole first (a listener whose accept queue is full, so the kernel drops further SYNs) and
the origin second. Only ``socket.getaddrinfo`` is replaced, for that one name.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from backends._connect import open_connection
from backends._wire import Ticket, WirePool
from protocols.errors import StorageError
from tests.storage.scripted import DATA, answer, read_all, scripted  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)

NAME = "two-addresses.test"


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port on 127.0.0.1 whose SYNs are dropped: a listener with a full accept queue."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(0)
    port = lsn.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.1)
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        lsn.close()


def _resolve_to(monkeypatch: pytest.MonkeyPatch, *ports: int) -> None:
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in ports]

    monkeypatch.setattr(socket, "getaddrinfo", fake)


async def test_a_black_holed_first_address_costs_a_stagger_not_the_timeout(
    scripted: Any, black_hole: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def plain(conn: socket.socket, first: int, last: int) -> None:
        conn.sendall(answer(first, last) + DATA[first : last + 1])

    origin = scripted(plain)
    _resolve_to(monkeypatch, black_hole, origin.port)
    t0 = time.monotonic()
    got = await read_all(f"http://{NAME}:{origin.port}/m/", connect_timeout_s=8.0)
    took = time.monotonic() - t0
    assert got == DATA
    # Serial attempts waited the whole connect timeout (8 s) on the black hole first.
    assert took < 3.0, f"{took:.1f} s: the second address waited for the first one's timeout"


def test_refused_addresses_hand_over_at_once_and_the_deadline_covers_them_all(black_hole: int, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = closed.getsockname()[1]
    closed.close()  # nothing listens: connect is refused
    ok = socket.socket()
    ok.bind(("127.0.0.1", 0))
    ok.listen(8)
    try:
        _resolve_to(monkeypatch, refused, ok.getsockname()[1])
        t0 = time.monotonic()
        open_connection(NAME, 0, 5.0, stagger_s=2.0).close()
        assert time.monotonic() - t0 < 1.0  # no stagger waited after a refusal
        _resolve_to(monkeypatch, black_hole, black_hole)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            open_connection(NAME, 0, 1.0, stagger_s=0.25)
        assert 0.9 < time.monotonic() - t0 < 2.0  # one deadline for both attempts, not 2 x 1 s
    finally:
        ok.close()


def _aborted_after(url: str, delay_s: float) -> tuple[float, BaseException | None]:
    """Abort a GET of ``url`` (connect timeout 10 s) ``delay_s`` in; how long its thread kept
    running after the abort, and what it raised."""
    pool = WirePool(connect_timeout_s=10.0, read_timeout_s=10.0, max_idle=1)
    ticket = Ticket()
    raised: list[BaseException] = []

    def get() -> None:
        try:
            pool.get(url, {}, max_redirects=0, ticket=ticket)
        except BaseException as e:  # noqa: BLE001 (the thread's outcome, checked by the caller)
            raised.append(e)

    thread = threading.Thread(target=get)
    thread.start()
    time.sleep(delay_s)
    aborted = time.monotonic()
    ticket.abort()
    thread.join(12.0)
    pool.close()
    return time.monotonic() - aborted, raised[0] if raised else None


def test_an_abort_ends_a_pending_connect_at_once(black_hole: int) -> None:
    took, error = _aborted_after(f"http://127.0.0.1:{black_hole}/m", 0.3)
    assert took < 1.0, f"the thread ran {took:.1f} s after the abort (the connect timeout is 10 s)"
    assert isinstance(error, StorageError) and "aborted" in str(error), error


def test_an_abort_ends_a_stalled_tls_handshake_at_once() -> None:
    """An origin that accepts the connection and never answers the ClientHello."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True)
    accepting.start()
    try:
        took, error = _aborted_after(f"https://127.0.0.1:{silent.getsockname()[1]}/m", 0.3)
        assert held, "the handshake never reached the origin"
        assert took < 1.0, f"the thread ran {took:.1f} s after the abort (the handshake's bound is 10 s)"
        assert isinstance(error, StorageError) and "aborted" in str(error), error
    finally:
        for s in held:
            s.close()
        silent.close()
