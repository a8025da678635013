"""The threaded byte path (backends._wire, backends._threadfetch) against lying origins,
nginx and moto: bodies are never accepted short, stalls time out, connections are reused,
a replaced object is caught, and bytes land off the event loop in the caller's buffer."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from backends import open_backend
from backends.http import HTTPBackend
from backends.s3 import S3Backend
from backends._wire import USER_AGENT, WirePool
from protocols.errors import IntegrityError, ObjectChanged, StorageError, StorageTimeout
from tests.fixtures.storage import HTTPModel, S3Model, payload

from tests.storage.scripted import BIG, DATA, FAST, answer, read_all, scripted  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)


async def test_good_origin_keep_alive_and_chunked(scripted: Any) -> None:
    """The scripted origin itself is sound: a plain answer and a chunked one both land."""

    def plain(conn: socket.socket, first: int, last: int) -> None:
        conn.sendall(answer(first, last) + DATA[first : last + 1])

    origin = scripted(plain)
    assert await read_all(origin.uri) == DATA
    assert origin.connections <= 2 < origin.requests  # keep-alive: requests share connections

    def chunked(conn: socket.socket, first: int, last: int) -> None:
        body = DATA[first : last + 1]
        head = answer(first, last).replace(f"Content-Length: {len(body)}\r\n".encode(),
                                           b"Transfer-Encoding: chunked\r\n")
        pieces = [body[i : i + 7000] for i in range(0, len(body), 7000)]
        conn.sendall(head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")

    assert await read_all(scripted(chunked).uri) == DATA


@pytest.mark.parametrize("how", ["consistent short", "drop mid-body", "chunked cut"])
async def test_truncated_bodies_are_never_accepted(scripted: Any, how: str) -> None:
    def short(conn: socket.socket, first: int, last: int) -> None:
        body = DATA[first : last + 1]
        if how == "consistent short":  # an honest Content-Length, one byte less than asked
            conn.sendall(answer(first, last, length=len(body) - 1) + body[:-1])
        elif how == "drop mid-body":
            conn.sendall(answer(first, last) + body[: len(body) // 2])
            conn.shutdown(socket.SHUT_RDWR)
        else:
            head = answer(first, last).replace(f"Content-Length: {len(body)}\r\n".encode(),
                                               b"Transfer-Encoding: chunked\r\n")
            conn.sendall(head + b"%x\r\n%s" % (len(body), body[:100]))
            conn.shutdown(socket.SHUT_RDWR)

    origin = scripted(short)
    expected = IntegrityError if how == "consistent short" else StorageError
    with pytest.raises(StorageError) as caught:
        await read_all(origin.uri)
    assert type(caught.value) is expected, repr(caught.value)
    assert origin.requests >= 2  # it resumed before giving up


async def test_stalled_origin_times_out(scripted: Any) -> None:
    def stall(conn: socket.socket, first: int, last: int) -> None:
        conn.sendall(answer(first, last) + DATA[first : first + 10])
        time.sleep(3)

    started = time.monotonic()
    with pytest.raises(StorageTimeout):
        await read_all(scripted(stall).uri)
    assert time.monotonic() - started < 2.5  # two stalls of read_timeout_s, not the origin's 3 s

    def silent(conn: socket.socket, first: int, last: int) -> None:
        time.sleep(3)  # no headers at all

    started = time.monotonic()
    with pytest.raises(StorageTimeout):
        await read_all(scripted(silent).uri)
    assert time.monotonic() - started < 2.5


async def test_cancel_wakes_the_thread_and_closes_its_connection(scripted: Any) -> None:
    released = threading.Event()

    def stall(conn: socket.socket, first: int, last: int) -> None:
        conn.sendall(answer(first, last))  # headers, then silence
        try:
            if conn.recv(1) == b"":
                released.set()  # the client hung up
        except ConnectionResetError:
            released.set()

    origin = scripted(stall)
    backend = open_backend(origin.uri, {**FAST, "read_timeout_s": 30})
    try:
        task = asyncio.create_task(backend.read_into(BIG, 0, memoryview(bytearray(1000))))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 0.6
        assert await asyncio.to_thread(released.wait, 2)
    finally:
        await backend.aclose()


async def test_idle_connection_closed_by_the_origin_is_replaced(scripted: Any) -> None:
    def once_per_connection(conn: socket.socket, first: int, last: int) -> None:
        # Keep-alive promised, then the origin hangs up after each answer (an idle timeout).
        conn.sendall(answer(first, last) + DATA[first : last + 1])
        conn.shutdown(socket.SHUT_RDWR)

    origin = scripted(once_per_connection)
    # No attempt and no resume to spare: a dead pooled connection must cost neither.
    assert await read_all(origin.uri, max_attempts=1, resume_attempts=0) == DATA
    assert origin.connections >= 5  # 5 chunks, each on a fresh connection


@pytest.mark.parametrize("http_model", ["nginx"], indirect=True)
async def test_nginx_reuses_connections_and_lands_off_the_loop(http_model: HTTPModel) -> None:
    backend = open_backend(http_model.uri, {**FAST, "chunk_bytes": 16 << 10, "read_timeout_s": 5})
    assert isinstance(backend, HTTPBackend) and backend._threads is not None
    data = http_model.files[BIG]
    lands_on: set[str] = set()
    buf = bytearray(len(data))
    try:
        info = await backend.stat(BIG)
        pool = backend._threads.pool
        for _ in range(3):
            await backend.read_into(BIG, 0, memoryview(buf), version=info.version)
            assert bytes(buf) == data
        # 3 reads of 130 ranged GETs each, on at most `concurrency` connections.
        assert pool.opened <= FAST["concurrency"]
        lands_on = {t.name.split("_")[0] for t in threading.enumerate()}
    finally:
        await backend.aclose()
    assert "cicada-http" in lands_on


@pytest.mark.parametrize("http_model", ["nginx"], indirect=True)
async def test_nginx_object_replaced_mid_load(http_model: HTTPModel) -> None:
    backend = open_backend(http_model.uri, {**FAST, "chunk_bytes": 16 << 10, "read_timeout_s": 5})
    try:
        info = await backend.stat(BIG)
        half = info.size // 2
        await backend.read_into(BIG, 0, memoryview(bytearray(half)), version=info.version)
        await asyncio.to_thread(http_model.put, BIG, payload(info.size, 77))
        with pytest.raises(ObjectChanged):
            await backend.read_into(BIG, half, memoryview(bytearray(info.size - half)),
                                    version=info.version)
    finally:
        await backend.aclose()


async def test_s3_presigned_path_lands_and_pins_versions(s3_model: S3Model) -> None:
    backend = open_backend(s3_model.uri, {**FAST, "endpoint_url": s3_model.endpoint,
                                          "region": "us-east-1", "read_timeout_s": 5})
    assert isinstance(backend, S3Backend) and backend._threads is not None
    data = s3_model.files[BIG]
    try:
        info = await backend.stat(BIG)
        buf = bytearray(len(data))
        await backend.read_into(BIG, 0, memoryview(buf), version=info.version)
        assert bytes(buf) == data
        assert backend._threads.pool.opened > 0  # moto answers "Connection: close": no reuse
        await asyncio.to_thread(s3_model.put, BIG, payload(len(data), 78))
        with pytest.raises(ObjectChanged):
            await backend.read_into(BIG, 0, memoryview(buf), version=info.version)
    finally:
        await backend.aclose()


async def test_redirect_to_another_origin_drops_authorization(scripted: Any) -> None:
    def target(conn: socket.socket, first: int, last: int) -> None:
        conn.sendall(answer(first, last) + DATA[first : last + 1])

    other = scripted(target)

    def redirect(conn: socket.socket, first: int, last: int) -> None:
        where = f"http://127.0.0.1:{other.port}/m/{BIG}"
        conn.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {where}\r\nContent-Length: 0\r\n\r\n".encode())

    first_origin = scripted(redirect)
    pool = WirePool(connect_timeout_s=2, read_timeout_s=2, max_idle=2)
    try:
        resp = await asyncio.to_thread(
            pool.get, f"{first_origin.uri}{BIG}", {"Authorization": "Bearer t", "Range": "bytes=0-9"},
            max_redirects=2)
        buf = bytearray(10)
        n = await asyncio.to_thread(resp.readinto, memoryview(buf))
        resp.release()
    finally:
        pool.close()
    assert resp.status == 206 and resp.url.startswith(f"http://127.0.0.1:{other.port}/")
    assert bytes(buf[:n]) == DATA[:n] and n > 0
    assert other.requests == 1
    assert b"authorization: bearer t" in first_origin.last_head.lower()  # sent where it belongs
    assert b"authorization" not in other.last_head.lower()  # and not past the redirect


@pytest.mark.parametrize("kind", ["nginx", "s3"])
async def test_engine_cold_start_on_the_threaded_path_is_exact(
    kind: str, model_dirs: dict[str, Path], request: pytest.FixtureRequest,
    served_root: Path, fault_proxy_factory: Any,
) -> None:
    """A whole cold start whose weight GETs all went through the threaded client (the proxy
    sees its User-Agent) gives outputs torch.equal to the plain local load."""
    from cicada_async.engine.runtime import Engine
    from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference

    model_dir = model_dirs["tiny-gpt2"]
    files = [p for p in model_dir.iterdir() if p.is_file()]
    if kind == "s3":
        model: S3Model = request.getfixturevalue("s3_model")
        for f in files:
            model.put(f"gpt/{f.name}", f.read_bytes())
        proxy = await fault_proxy_factory(model.endpoint)
        uri = f"{model.uri}/gpt"
        storage = {"s3": {**FAST, "read_timeout_s": 5, "endpoint_url": proxy.url, "region": "us-east-1"}}
    else:
        directory = served_root / f"wire-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        for f in files:
            shutil.copyfile(f, directory / f.name)
        proxy = await fault_proxy_factory(request.getfixturevalue("nginx_origin"))
        uri = f"{proxy.url}/{directory.name}/"
        storage = {"http": {**FAST, "read_timeout_s": 5}}
    inputs = inputs_for(model_dir)
    async with Engine(storage=storage, read_bytes=64 << 10, load_timeout_s=30) as engine:
        out = await asyncio.wait_for(engine.instance("m", uri).infer(inputs), 30)
    assert_equal_outputs(out, reference(model_dir, inputs))
    weight_gets = [e for e in proxy.log if e.method == "GET" and ".safetensors" in e.path
                   and "Range" in e.headers]
    assert len(weight_gets) > 3
    assert all(e.headers.get("User-Agent") == USER_AGENT for e in weight_gets)
