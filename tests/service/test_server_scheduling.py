"""Scheduling through real V2 clients over the fake engine: priorities, deadlines, shedding, single flight."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from cicada_async.service.metrics import parse_text
from protocols.errors import DeadlineExceeded
from protocols.serving import Priority
from tests.fixtures.server import FakeEngine, LiveServer
from tests.fixtures.triton import (
    TRITON_WARNINGS,
    expected,
    get_text,
    run_server,
    send_value,
)

pytestmark = TRITON_WARNINGS


# -- scheduling -----------------------------------------------------------------------------------------
def test_priority_order_is_deterministic(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine) as server, concurrent.futures.ThreadPoolExecutor(8) as pool:
        server.call(lambda: server.repo.load("alpha"))
        inst = server.repo.get("alpha").instance
        server.sync(server.scheduler.hold)
        futs = [pool.submit(send_value, server, "alpha", 5.0, priority=5)]
        server.wait_until(lambda: server.scheduler.queued("alpha") == 1)
        futs.append(pool.submit(send_value, server, "alpha", 9.0, priority=9))
        server.wait_until(lambda: server.scheduler.queued("alpha") == 2)
        futs.append(pool.submit(send_value, server, "alpha", 1.0, priority=1))
        futs.append(pool.submit(send_value, server, "alpha", 7.0))  # 0 -> model default (10)
        server.wait_until(lambda: server.scheduler.queued("alpha") == 4)
        server.sync(server.scheduler.release)
        results = [f.result(30) for f in futs]
        assert not any(isinstance(r, Exception) for r in results), results
        assert [v for _, _, v in inst.calls] == [1.0, 5.0, 9.0, 7.0]
        assert [p for _, p, _ in inst.calls] == [1, 5, 9, 10]


def test_earlier_deadline_first_within_a_priority(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine) as server, concurrent.futures.ThreadPoolExecutor(4) as pool:
        server.call(lambda: server.repo.load("alpha"))
        server.sync(server.scheduler.hold)
        late = pool.submit(send_value, server, "alpha", 1.0, 3, 30_000_000)
        server.wait_until(lambda: server.scheduler.queued("alpha") == 1)
        soon = pool.submit(send_value, server, "alpha", 2.0, 3, 10_000_000)
        server.wait_until(lambda: server.scheduler.queued("alpha") == 2)
        server.sync(server.scheduler.release)
        late.result(30), soon.result(30)
        assert [v for _, _, v in server.repo.get("alpha").instance.calls] == [2.0, 1.0]


def test_shed_lowest_priority_first_with_retry_after(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine, models={"alpha": {"max_queue": 2}}) as server, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        server.call(lambda: server.repo.load("alpha"))
        server.sync(server.scheduler.hold)
        low = pool.submit(send_value, server, "alpha", 1.0, 8)
        server.wait_until(lambda: server.scheduler.queued("alpha") == 1)
        mid = pool.submit(send_value, server, "alpha", 2.0, 5)
        server.wait_until(lambda: server.scheduler.queued("alpha") == 2)
        high = pool.submit(send_value, server, "alpha", 3.0, 1)  # full: displaces the priority-8 one
        shed = low.result(30)
        assert isinstance(shed, InferenceServerException) and str(shed.status()) == "503"
        assert "displaced" in shed.message()
        # A newcomer less urgent than everything queued is refused itself.
        refused = send_value(server, "alpha", 4.0, 9)
        assert isinstance(refused, InferenceServerException) and str(refused.status()) == "503"
        server.sync(server.scheduler.release)
        assert not isinstance(mid.result(30), Exception) and not isinstance(high.result(30), Exception)
        text = server.call(lambda: get_text(server, "/metrics"))
        assert 'cicada_requests_shed_total{model="alpha",reason="displaced"} 1' in text


async def test_retry_after_header_on_total_bound(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine, max_queue_total=1, retry_after_s=3) as server:
        server.sync(server.scheduler.hold)
        body, _ = __import__("protocols.v2", fromlist=["x"]).encode_request({"x": torch.ones(1, 4)}, binary=False)
        async with aiohttp.ClientSession(server.http_url) as s:
            first = asyncio.create_task(s.post("/v2/models/alpha/infer", data=body))
            while server.sync(lambda: server.scheduler.total_queued) < 1:
                await asyncio.sleep(0.01)
            async with s.post("/v2/models/beta/infer", data=body) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "3"
                assert "queue is full" in (await r.json())["error"]
            server.sync(server.scheduler.release)
            async with await first as r:
                assert r.status == 200


def test_deadline_expires_in_queue_with_504(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine) as server:
        server.call(lambda: server.repo.load("alpha"))
        server.sync(server.scheduler.hold)
        t0 = time.monotonic()
        r = send_value(server, "alpha", 1.0, 0, 50_000)  # 50 ms
        assert isinstance(r, InferenceServerException) and str(r.status()) == "504"
        assert time.monotonic() - t0 < 5
        server.sync(server.scheduler.release)
        assert server.repo.get("alpha").instance.calls == []


def test_single_flight_50_concurrent_cold(fake_engine: FakeEngine) -> None:
    fake_engine.load_s = 0.3

    async def burst(server: LiveServer) -> list[Any]:
        async with aioclient.InferenceServerClient(server.url, conn_limit=64) as c:
            async def one(i: int) -> Any:
                inp = aioclient.InferInput("x", [1, 4], "FP32")
                inp.set_data_from_numpy(np.full((1, 4), float(i), dtype=np.float32))
                return (await c.infer("alpha", [inp], priority=1 + i % 3)).as_numpy("y")
            return await asyncio.gather(*(one(i) for i in range(50)))

    with run_server(fake_engine) as server:
        outs = asyncio.run(burst(server))
        inst = server.repo.get("alpha").instance
        assert inst.loads == 1 and len(inst.calls) == 50
        for i, y in enumerate(outs):
            np.testing.assert_array_equal(y, expected(server, "alpha", np.full((1, 4), float(i), dtype=np.float32)))
        m = parse_text(server.call(lambda: get_text(server, "/metrics")))
        assert m['cicada_cold_starts_total{model="alpha",outcome="success"}'] == 1
        assert m['nv_inference_request_success{model="alpha",version="1"}'] == 50


def test_failed_cold_start_fails_its_waiters_once(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine) as server, concurrent.futures.ThreadPoolExecutor(8) as pool:
        inst = server.repo.get("alpha").instance
        inst.fail_next_load = True
        server.sync(inst.load_gate.clear)
        futs = [pool.submit(send_value, server, "alpha", float(i)) for i in range(5)]
        server.wait_until(lambda: server.scheduler.queued("alpha") == 4)
        server.sync(inst.load_gate.set)
        results = [f.result(30) for f in futs]
        assert all(isinstance(r, InferenceServerException) and str(r.status()) == "500" for r in results)
        assert inst.loads == 1


def test_fetch_priority_follows_most_urgent_waiter(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine) as server, concurrent.futures.ThreadPoolExecutor(8) as pool:
        a, b = (server.repo.get(n).instance for n in ("alpha", "beta"))
        for inst in (a, b):
            server.sync(inst.load_gate.clear)
        fa = [pool.submit(send_value, server, "alpha", 1.0, 6)]
        fb = [pool.submit(send_value, server, "beta", 1.0, 7)]
        server.wait_until(lambda: a.fetch_priorities == [6] and b.fetch_priorities == [7])
        fb.append(pool.submit(send_value, server, "beta", 2.0, 2))
        server.wait_until(lambda: b.fetch_priorities == [7, 2])
        fa.append(pool.submit(send_value, server, "alpha", 2.0, 9))  # less urgent: no change
        server.wait_until(lambda: server.scheduler.queued("alpha") == 1)
        assert a.fetch_priorities == [6]
        for inst in (a, b):
            server.sync(inst.load_gate.set)
        assert not any(isinstance(f.result(30), Exception) for f in fa + fb)
        assert a.loads == b.loads == 1




def test_a_strictly_more_urgent_request_is_handed_over_while_one_runs(fake_engine: FakeEngine) -> None:
    """The engine switches at layer boundaries, so the scheduler hands a more urgent request to
    it at once; an equally or less urgent one waits for the running forward."""
    with run_server(fake_engine, names=("alpha", "beta")) as server, concurrent.futures.ThreadPoolExecutor(8) as pool:
        for n in ("alpha", "beta"):
            server.call(lambda n=n: server.repo.load(n))
        alpha, beta = (server.repo.get(n).instance for n in ("alpha", "beta"))
        server.sync(alpha.gate.clear)  # alpha's forward "runs" until released
        futs = [pool.submit(send_value, server, "alpha", 1.0, priority=5)]
        server.wait_until(lambda: len(alpha.calls) == 1)
        futs.append(pool.submit(send_value, server, "beta", 2.0, priority=5))
        futs.append(pool.submit(send_value, server, "beta", 3.0, priority=9))
        server.wait_until(lambda: server.scheduler.queued("beta") == 2)
        futs.append(pool.submit(send_value, server, "beta", 4.0, priority=1))
        server.wait_until(lambda: len(beta.calls) == 1)
        assert [v for _, _, v in beta.calls] == [4.0]  # handed over; 2.0 and 3.0 still wait
        time.sleep(0.2)
        assert server.scheduler.queued("beta") == 2
        server.sync(alpha.gate.set)
        results = [f.result(30) for f in futs]
        assert not any(isinstance(r, Exception) for r in results), results
        assert [v for _, _, v in beta.calls] == [4.0, 2.0, 3.0]


def test_a_zero_deadline_is_expired_not_none(fake_engine: FakeEngine) -> None:
    # gRPC's context.time_remaining() is 0.0 once the deadline has passed: that is a deadline
    # already expired, not "no deadline" (it used to run the request with no bound at all).
    with run_server(fake_engine) as server:
        server.call(lambda: server.repo.load("alpha"))
        entry = server.sync(lambda: server.repo.get("alpha"))
        x = {"x": torch.ones(1, 4)}
        with pytest.raises(DeadlineExceeded):
            server.call(lambda: server.scheduler.submit(entry, x, priority=Priority.DEFAULT, timeout_s=0.0), timeout=10)
        out, _ = server.call(lambda: server.scheduler.submit(entry, x, priority=Priority.DEFAULT, timeout_s=None))
        assert set(out) == {"y", "argmax"}
