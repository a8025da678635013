"""Overload: bounded heap, bodies refused before they are read, deadlines, bounded memory."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from loadtest.soak import ServerProcess
from tests.fixtures.server import FakeEngine, LiveServer, fake_config, live_server


def _body(priority: int = 0, timeout_us: int | None = None, pad: int = 0) -> bytes:
    params: dict[str, Any] = {"priority": priority} if priority else {}
    if timeout_us:
        params["timeout"] = timeout_us
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}],
           "parameters": params, "id": "p" * pad}
    return orjson.dumps(doc)


def _server(engine: FakeEngine, **server: Any) -> Any:
    return live_server(fake_config(**server), engine_factory=lambda c: engine)


async def _headers_only(port: int, path: str, length: int) -> tuple[int, dict[str, str], float]:
    """Send a request's headers and NO body; the answer proves the body was never needed."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, time.monotonic() - t0


async def _post(s: aiohttp.ClientSession, body: bytes) -> tuple[int, dict[str, str]]:
    async with s.post("/v2/models/alpha/infer", data=body) as r:
        await r.read()
        return r.status, dict(r.headers)


async def test_full_queue_of_urgent_requests_refuses_before_the_body() -> None:
    engine = FakeEngine()
    with _server(engine, max_queue_total=4) as server:
        server.call(lambda: server.repo.load("alpha"))
        server.sync(server.scheduler.hold)
        async with aiohttp.ClientSession(server.http_url) as s:
            queued = [asyncio.create_task(_post(s, _body(priority=1))) for _ in range(4)]
            await server_wait(server, lambda: server.scheduler.total_queued == 4)
            status, headers, took = await _headers_only(server.port, "/v2/models/alpha/infer", 10_000_000)
            assert status == 503 and headers["Retry-After"] == "1" and took < 2
            # A less urgent queue can still be displaced, so then the body is read (priority is in it).
            server.sync(server.scheduler.release)
            assert [(await t)[0] for t in queued] == [200] * 4


async def server_wait(server: LiveServer, pred: Any, timeout: float = 10) -> None:
    """Poll loop-owned state without blocking this test's own loop (its tasks must run)."""
    end = time.monotonic() + timeout
    while not server.sync(pred):
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_body_budget_refuses_before_reading() -> None:
    engine = FakeEngine()
    with _server(engine, max_body_bytes_in_flight=100_000) as server:
        server.call(lambda: server.repo.load("alpha"))
        server.sync(server.scheduler.hold)
        async with aiohttp.ClientSession(server.http_url) as s:
            held = asyncio.create_task(_post(s, _body(pad=80_000)))  # queued, holding 80 KB
            await server_wait(server, lambda: server.scheduler.total_queued == 1)
            status, headers, _ = await _headers_only(server.port, "/v2/models/alpha/infer", 50_000)
            assert status == 503 and "Retry-After" in headers
            small = asyncio.create_task(_post(s, _body()))  # small bodies still fit the budget
            await server_wait(server, lambda: server.scheduler.total_queued == 2)
            server.sync(server.scheduler.release)
            assert (await held)[0] == 200 and (await small)[0] == 200

            assert server.sync(lambda: server.plane.budget.used) == 0  # every reservation returned


async def test_per_model_bound_sheds_with_retry_after() -> None:
    engine = FakeEngine()
    with _server(engine, max_queue_total=6, retry_after_s=3.0) as server:
        server.call(lambda: server.repo.load("alpha"))
        server.sync(lambda: setattr(server.repo.get("alpha").config, "max_queue", 3))
        server.sync(server.scheduler.hold)
        async with aiohttp.ClientSession(server.http_url) as s:
            alpha = [asyncio.create_task(_post(s, _body(priority=5))) for _ in range(5)]
            await server_wait(server, lambda: server.scheduler.queued("alpha") == 3)
            await asyncio.sleep(0.2)  # the two past the per-model bound are answered already
            server.sync(server.scheduler.release)
            results = [await t for t in alpha]
    statuses = sorted(st for st, _ in results)
    assert statuses.count(503) == 2 and statuses.count(200) == 3, statuses
    assert all(h["Retry-After"] == "3" for st, h in results if st == 503)


async def test_no_request_waits_past_its_deadline_even_while_running() -> None:
    engine = FakeEngine()
    with _server(engine) as server:
        server.call(lambda: server.repo.load("alpha"))
        inst = server.repo.get("alpha").instance
        server.sync(inst.gate.clear)  # the forward hangs
        async with aiohttp.ClientSession(server.http_url) as s:
            t0 = time.monotonic()
            running = asyncio.create_task(_post(s, _body(timeout_us=300_000)))
            queued = asyncio.create_task(_post(s, _body(timeout_us=400_000)))
            (st1, _), (st2, _) = await running, await queued
            took = time.monotonic() - t0
            assert st1 == 504 and st2 == 504 and took < 1.5, (st1, st2, took)
            server.sync(inst.gate.set)
            assert (await _post(s, _body()))[0] == 200


# -- memory under a flood of large bodies: a real server process ---------------------------------
@pytest.mark.timeout(120)
def test_rss_bounded_under_a_flood_of_large_bodies(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    mb = 1 << 20
    cfg = f"""
[server]
max_request_bytes = {8 * mb}
max_body_bytes_in_flight = {16 * mb}

[models.m]
uri = "{model_dirs['tiny-mlp']}"
"""
    server = ServerProcess(cfg, tmp_path).start()
    try:
        big = b" " * (6 * mb)  # fits max_request_bytes; 48 of them would be 288 MB
        too_big = b" " * (9 * mb)
        base = server.sample().rss_mb
        peak = [base]
        stop = [False]

        def sampler() -> None:
            while not stop[0]:
                peak[0] = max(peak[0], server.sample().rss_mb)
                time.sleep(0.02)

        async def flood() -> list[int | str]:
            async with aiohttp.ClientSession(server.url, timeout=aiohttp.ClientTimeout(total=60)) as s:
                async def one(i: int) -> int | str:
                    body = too_big if i % 4 == 0 else big
                    try:
                        async with s.post("/v2/models/m/infer", data=body) as r:
                            await r.read()
                            return r.status
                    except aiohttp.ClientError as e:  # the server may hang up on an unread body
                        return type(e).__name__
                return await asyncio.gather(*(one(i) for i in range(64)))

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            f = pool.submit(sampler)
            statuses = asyncio.run(flood())
            stop[0] = True
            f.result()
        counts = {k: statuses.count(k) for k in set(statuses)}
        # 413 for the oversized, 503 for bodies past the budget, 400 for the ones read (spaces
        # are not JSON). No 500, no hang; memory held to the budget plus copies, not the flood.
        assert set(counts) <= {400, 413, 503, "ClientOSError", "ServerDisconnectedError"}, counts
        assert counts.get(413, 0) + counts.get(503, 0) > 0, counts
        growth = peak[0] - base
        assert growth < 100, f"RSS grew {growth:.0f} MB during the flood ({counts})"
        print(f"flood: {counts}, rss base {base:.0f} MB, peak {peak[0]:.0f} MB, growth {growth:.0f} MB")
    finally:
        assert server.stop() == 0
