"""The service through real V2 clients (tritonclient sync + aio, kserve), over the fake engine.

The fake engine makes lifecycle and scheduling deterministic; tests/service/test_server_models.py runs
the same paths over the real engine and zoo models.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from cicada_async.service.metrics import parse_text
from tests.fixtures.triton import TRITON_WARNINGS, expected, get_text, run_server, send_value, status_of, x_input
from tests.fixtures.server import FakeEngine, LiveServer, fake_config

pytestmark = TRITON_WARNINGS

httpclient = pytest.importorskip("tritonclient.http")
aioclient = pytest.importorskip("tritonclient.http.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def client(fake_server: LiveServer) -> Iterator[Any]:
    c = httpclient.InferenceServerClient(fake_server.url)
    yield c
    c.close()


# -- health and metadata ------------------------------------------------------------------------------
def test_health_and_metadata_tritonclient(fake_server: LiveServer, client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "cicada-async" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("alpha")
    md = client.get_model_metadata("alpha")
    assert md["name"] == "alpha" and md["inputs"][0]["name"] == "x" and md["outputs"][0]["name"] == "y"
    assert client.get_model_metadata("alpha", model_version="1")["name"] == "alpha"
    index = client.get_model_repository_index()
    assert {m["name"]: m["state"] for m in index} == {"alpha": "UNAVAILABLE", "beta": "UNAVAILABLE"}


async def test_health_raw_bodies_and_content_type(fake_server: LiveServer) -> None:
    async with aiohttp.ClientSession(fake_server.http_url) as s:
        for path, body in [("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})]:
            async with s.get(path) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "application/json"
                assert await r.json() == body
        async with s.get("/v2/models") as r:
            assert (await r.json())["models"] == ["alpha", "beta"]
        async with s.get("/v2/models/alpha/ready") as r:
            assert (await r.json())["ready"] is True


async def test_kserve_client_health_and_infer(fake_server: LiveServer) -> None:
    kserve = pytest.importorskip("kserve")
    base = fake_server.http_url
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    async with kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2")) as kc:
        assert await kc.is_server_live(base) is True
        assert await kc.is_server_ready(base) is True
        assert await kc.is_model_ready(base, "alpha") is True
        for binary in (False, True):
            inp = kserve.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            res = await kc.infer(base, kserve.InferRequest("alpha", infer_inputs=[inp], request_id="k1"), model_name="alpha")
            out = {o.name: o for o in res.outputs}
            assert res.id == "k1"
            np.testing.assert_array_equal(out["y"].as_numpy(), expected(fake_server, "alpha", x))
        # Errors carry the server's message because the content type is exactly application/json.
        import httpx

        with pytest.raises(httpx.HTTPStatusError, match="unknown model") as e:
            await kc.infer(base, kserve.InferRequest("nope", infer_inputs=[inp]), model_name="nope")
        assert e.value.response.status_code == 404


# -- inference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_tritonclient(fake_server: LiveServer, client: Any, binary_in: bool, binary_out: bool) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=binary_out),
               httpclient.InferRequestedOutput("argmax", binary_data=binary_out)]
    res = client.infer("alpha", [x_input(x, binary_in)], outputs=outputs, request_id="r7")
    want = expected(fake_server, "alpha", x)
    np.testing.assert_array_equal(res.as_numpy("y"), want)
    np.testing.assert_array_equal(res.as_numpy("argmax"), want.argmax(-1))
    assert res.get_response()["id"] == "r7"
    # No outputs named: tritonclient asks for binary_data_output and gets everything.
    res = client.infer("alpha", [x_input(x, binary_in)], model_version="1")
    np.testing.assert_array_equal(res.as_numpy("y"), want)


async def test_infer_tritonclient_aio_and_cold_then_warm(fake_server: LiveServer) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    async with aioclient.InferenceServerClient(fake_server.url) as c:
        assert fake_server.repo.get("beta").state == "unloaded"
        inp = aioclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        res = await c.infer("beta", [inp])
        np.testing.assert_array_equal(res.as_numpy("y"), expected(fake_server, "beta", x))
        assert fake_server.repo.get("beta").state == "ready"
        res = await c.infer("beta", [inp])
        np.testing.assert_array_equal(res.as_numpy("y"), expected(fake_server, "beta", x))
        assert fake_server.repo.get("beta").instance.loads == 1


# -- errors ---------------------------------------------------------------------------------------------
def test_error_statuses_tritonclient(fake_server: LiveServer, client: Any) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [x_input(x)])
    assert status_of(e) == "404" and "unknown model" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("alpha", [x_input(x)], model_version="7")
    assert status_of(e) == "404"
    bad = x_input(x, binary=False)
    bad.set_shape([2, 4])  # shape says 8 values, data has 4
    with pytest.raises(InferenceServerException) as e:
        client.infer("alpha", [bad])
    assert status_of(e) == "400"
    with pytest.raises(InferenceServerException) as e:
        client.infer("alpha", [x_input(x)], outputs=[httpclient.InferRequestedOutput("nope")])
    assert status_of(e) == "400" and "unknown output" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.is_model_ready("nope") or client.get_model_metadata("nope")
    assert status_of(e) == "404"


async def test_error_bodies_raw(fake_server: LiveServer) -> None:
    async with aiohttp.ClientSession(fake_server.http_url) as s:
        cases = [
            ("POST", "/v2/models/nope/infer", b"{}", 404),
            ("POST", "/v2/models/..%2Fetc/infer", b"{}", 400),
            ("POST", "/v2/models/alpha/infer", b"{not json", 400),
            ("POST", "/v2/models/alpha/infer", orjson.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}), 400),
            ("GET", "/v2/models/nope", None, 404),
            ("POST", "/v2/repository/models/nope/load", None, 404),
        ]
        for method, path, body, status in cases:
            async with s.request(method, path, data=body) as r:
                assert r.status == status, path
                assert r.headers["Content-Type"] == "application/json"
                assert isinstance((await r.json())["error"], str)


async def test_body_limit_including_chunked() -> None:
    engine = FakeEngine()
    with run_server(engine, max_request_bytes=1000) as server:
        async with aiohttp.ClientSession(server.http_url) as s:
            async with s.post("/v2/models/alpha/infer", data=b"x" * 2000) as r:
                assert r.status == 413 and r.headers["Content-Type"] == "application/json"

            async def chunks() -> Any:
                for _ in range(20):
                    yield b"y" * 100

            async with s.post("/v2/models/alpha/infer", data=chunks()) as r:
                assert r.status == 413


def test_load_failure_is_500_and_retried(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine) as server:
        server.repo.get("alpha").instance.fail_next_load = True
        c = httpclient.InferenceServerClient(server.url)
        x = np.ones((1, 4), dtype=np.float32)
        with pytest.raises(InferenceServerException) as e:
            c.infer("alpha", [x_input(x)])
        assert status_of(e) == "500" and "simulated storage failure" in e.value.message()
        assert not c.is_model_ready("alpha")
        assert c.get_model_repository_index()[0]["reason"] == "simulated storage failure"
        np.testing.assert_array_equal(c.infer("alpha", [x_input(x)]).as_numpy("y"), expected(server, "alpha", x))
        assert server.repo.get("alpha").instance.loads == 2
        c.close()


# -- lifecycle ------------------------------------------------------------------------------------------
def test_keep_alive_unloads_idle_model(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine, keep_alive_check_s=0.02, models={"alpha": {"keep_alive_s": 0.2}}) as server:
        inst = server.repo.get("alpha").instance
        assert not isinstance(send_value(server, "alpha", 1.0), Exception)
        assert inst.state == "ready"
        server.wait_until(lambda: inst.state == "unloaded", timeout=5)
        assert inst.unloads == 1
        assert not isinstance(send_value(server, "alpha", 1.0), Exception)  # cold again
        assert inst.loads == 2
        text = server.call(lambda: get_text(server, "/metrics"))
        assert 'cicada_evictions_total{model="alpha",reason="keep_alive"} 1' in text


def test_memory_budget_evicts_least_recently_used(fake_engine: FakeEngine) -> None:
    fake_engine.model_bytes = 1000
    with run_server(fake_engine, names=("a", "b", "c"), memory_budget_bytes=2500) as server:
        insts = {n: server.repo.get(n).instance for n in "abc"}
        for n in "ab":
            assert not isinstance(send_value(server, n, 1.0), Exception)
        assert not isinstance(send_value(server, "a", 1.0), Exception)  # a is now more recent than b
        assert not isinstance(send_value(server, "c", 1.0), Exception)
        server.wait_until(lambda: insts["b"].state == "unloaded")
        assert insts["a"].state == insts["c"].state == "ready"
        assert server.sync(server.repo.resident_bytes) <= 2500


def test_repository_load_unload_api(fake_engine: FakeEngine) -> None:
    with run_server(fake_engine) as server:
        c = httpclient.InferenceServerClient(server.url)
        c.load_model("beta")
        states = {m["name"]: m["state"] for m in c.get_model_repository_index()}
        assert states == {"alpha": "UNAVAILABLE", "beta": "READY"}
        c.unload_model("beta")
        assert server.repo.get("beta").instance.state == "unloaded"
        with pytest.raises(InferenceServerException) as e:
            c.load_model("nope")
        assert status_of(e) == "404"
        c.close()


def test_requests_during_load_wait_and_are_served(fake_engine: FakeEngine) -> None:
    """Never refused as 'not ready' while a model loads (the scale-from-zero failure)."""
    with run_server(fake_engine) as server, concurrent.futures.ThreadPoolExecutor(8) as pool:
        inst = server.repo.get("alpha").instance
        server.sync(inst.load_gate.clear)
        loader = pool.submit(lambda: server.call(lambda: server.repo.load("alpha")))
        server.wait_until(lambda: inst.state == "loading")
        futs = [pool.submit(send_value, server, "alpha", float(i)) for i in range(4)]
        server.wait_until(lambda: server.scheduler.queued("alpha") == 4)
        c = httpclient.InferenceServerClient(server.url)
        assert c.is_server_ready() and c.is_model_ready("alpha")
        c.close()
        server.sync(inst.load_gate.set)
        loader.result(30)
        assert not any(isinstance(f.result(30), Exception) for f in futs)
        assert inst.loads == 1


def test_metrics_exposition(fake_server: LiveServer, client: Any) -> None:
    client.infer("alpha", [x_input(np.ones((1, 4), dtype=np.float32))])
    text = fake_server.call(lambda: get_text(fake_server, "/metrics"))
    for family in ["nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                   "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                   "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count",
                   "cicada_cold_starts_total", "cicada_cold_start_seconds", "cicada_bytes_fetched_total",
                   "cicada_stall_seconds", "cicada_pipeline_utilization", "cicada_model_state"]:
        assert f"# TYPE {family} " in text, family
    m = parse_text(text)
    assert m['cicada_model_state{model="alpha",state="ready"}'] == 1
    assert m['cicada_model_state{model="beta",state="unloaded"}'] == 1
    assert m['cicada_cold_start_seconds_count{model="alpha"}'] == 1
    assert m['cicada_cold_start_stage_seconds{model="alpha",stage="fetch_s"}'] > 0
    assert m['cicada_bytes_fetched_total{model="alpha"}'] == 1000
    assert m['nv_inference_pending_request_count{model="alpha",version="1"}'] == 0


def test_shutdown_drains_admitted_requests(fake_engine: FakeEngine) -> None:
    server = LiveServer(__import__("cicada_async.service.server", fromlist=["x"]).build_app(
        fake_config(), engine_factory=lambda c: fake_engine)).start()
    try:
        server.call(lambda: server.repo.load("alpha"))
        inst = server.repo.get("alpha").instance
        server.sync(inst.gate.clear)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fut = pool.submit(send_value, server, "alpha", 1.0)
            server.wait_until(lambda: len(inst.calls) == 1)
            stopper = threading.Thread(target=lambda: server.call(server.runner.cleanup))  # type: ignore[union-attr]
            stopper.start()
            time.sleep(0.2)
            server.sync(inst.gate.set)
            assert not isinstance(fut.result(30), Exception)
            stopper.join(30)
    finally:
        server.runner = None
        server.stop()
