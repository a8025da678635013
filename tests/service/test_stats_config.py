"""The statistics and model configuration extensions over HTTP, through tritonclient.http.

Over the fake engine (a live aiohttp server in a thread): counts are exact there. The same
endpoints over gRPC, on a real process, are in tests/service/test_grpc.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from cicada_async.service.config import TensorSpec
from tests.fixtures.server import FakeEngine, LiveServer
from tests.fixtures.triton import TRITON_WARNINGS, run_server, status_of, x_input

pytestmark = TRITON_WARNINGS
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture
def client(fake_server: LiveServer) -> Iterator[Any]:
    c = httpclient.InferenceServerClient(fake_server.url)
    yield c
    c.close()


def _stats(client: Any, model: str) -> dict[str, Any]:
    (s,) = client.get_inference_statistics(model)["model_stats"]
    return s


def test_statistics_count_success_and_failure(client: Any) -> None:
    before = _stats(client, "alpha")
    assert before["inference_count"] == before["execution_count"] == 0 and before["last_inference"] == 0
    assert set(before["inference_stats"]) == {"success", "fail", "queue", "compute_input", "compute_infer",
                                              "compute_output"}
    x = np.ones((2, 4), dtype=np.float32)
    client.infer("alpha", [x_input(x)])
    client.infer("alpha", [x_input(x, binary=False)], priority=1)
    bad = httpclient.InferInput("x", [1, 4], "INT64")  # the model takes FP32
    bad.set_data_from_numpy(np.ones((1, 4), dtype=np.int64))
    with pytest.raises(InferenceServerException):
        client.infer("alpha", [bad])
    with pytest.raises(InferenceServerException):
        client.infer("nope", [x_input(x)])  # not a model: nobody's failure
    s = _stats(client, "alpha")
    st = s["inference_stats"]
    assert s["name"] == "alpha" and s["version"] == "1"
    assert s["inference_count"] == s["execution_count"] == 2
    assert st["success"]["count"] == 2 and st["fail"]["count"] == 1
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert st[key]["count"] == 2, key
    assert st["compute_infer"]["ns"] > 0 and st["success"]["ns"] >= st["compute_infer"]["ns"]
    assert st["fail"]["ns"] > 0 and s["last_inference"] > 0
    # The other model is untouched; the all-models form lists both, and the version path works.
    assert _stats(client, "beta")["inference_stats"]["success"]["count"] == 0
    everything = client.get_inference_statistics()["model_stats"]
    assert [m["name"] for m in everything] == ["alpha", "beta"]
    assert client.get_inference_statistics("alpha", model_version="1")["model_stats"][0]["inference_count"] == 2


def test_statistics_and_config_errors(client: Any) -> None:
    for call in (lambda: client.get_inference_statistics("nope"), lambda: client.get_model_config("nope"),
                 lambda: client.get_inference_statistics("alpha", model_version="7")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert status_of(e) == "404"


async def test_stats_raw_body(fake_server: LiveServer) -> None:
    async with aiohttp.ClientSession(fake_server.http_url) as s:
        async with s.get("/v2/models/stats") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/json"
            body = await r.json()
    assert body["model_stats"][0]["inference_stats"]["queue"] == {"count": 0, "ns": 0}


def test_model_config_from_metadata(client: Any) -> None:
    cfg = client.get_model_config("alpha")
    # Before the first load the fake model's io_spec is known anyway; dims are the whole
    # shape because max_batch_size is 0 (no batching), and no dynamic_batching is claimed.
    assert cfg == {"name": "alpha", "platform": "pytorch", "backend": "pytorch", "max_batch_size": 0,
                   "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]}],
                   "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, 3]},
                              {"name": "argmax", "data_type": "TYPE_INT64", "dims": [-1]}]}
    assert client.get_model_config("alpha", model_version="1") == cfg


def test_model_config_from_configured_io() -> None:
    engine = FakeEngine()
    io = {"inputs": [TensorSpec("x", "BF16", [-1, 8])], "outputs": [TensorSpec("y", "BOOL", [-1])]}
    with run_server(engine, models={"alpha": io}) as server:
        c = httpclient.InferenceServerClient(server.url)
        try:
            cfg = c.get_model_config("alpha")
        finally:
            c.close()
    assert cfg["input"] == [{"name": "x", "data_type": "TYPE_BF16", "dims": [-1, 8]}]
    assert cfg["output"] == [{"name": "y", "data_type": "TYPE_BOOL", "dims": [-1]}]


def test_extensions_listed_are_served(client: Any) -> None:
    ext = client.get_server_metadata()["extensions"]
    assert set(ext) == {"binary_tensor_data", "model_repository", "schedule_policy", "statistics",
                        "model_configuration"}
