"""V2 over gRPC on a live ``cicada serve`` process, through tritonclient.grpc (sync and aio)
and kserve's InferenceGRPCClient, each in a child process of its own (tests/service/grpc_probe.py
says why). The HTTP side of the same process is asked with tritonclient.http here.

Models: ``mlp`` (tiny-mlp from disk), ``slow`` (the same weights from an origin trickling
512 B per 0.25 s, max_queue 1: a cold start of minutes) and ``broken`` (its cicada.json is
not JSON). Auth is on: ``all-token`` has both scopes, ``inf-token`` only inference.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cicada_async.models.catalogue import make_model
from loadtest.soak import ServerProcess, free_port
from tests.fixtures.helpers import reference
from tests.fixtures.triton import TRITON_WARNINGS
from tests.service.trickle_origin import TrickleOrigin

pytestmark = TRITON_WARNINGS
httpclient = pytest.importorskip("tritonclient.http")
ROOT = Path(__file__).resolve().parents[2]
IDS = np.array([[1, 2, 3, 4]], dtype=np.int64)
ALL = {"Authorization": "Bearer all-token"}


class Live:
    def __init__(self, server: ServerProcess, grpc_port: int) -> None:
        self.server, self.grpc_port = server, grpc_port

    def probe(self, scenario: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "tests.service.grpc_probe", scenario, str(self.grpc_port),
                               str(self.server.port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def http_output(self) -> list[Any]:
        """The same request over HTTP (checked against the plain forward too)."""
        c = httpclient.InferenceServerClient(f"127.0.0.1:{self.server.port}")
        try:
            i = httpclient.InferInput("input_ids", [1, 4], "INT64")
            i.set_data_from_numpy(IDS)
            return c.infer("mlp", [i], headers=ALL).as_numpy("output").tolist()
        finally:
            c.close()


def start(root: Path, origin_port: int, mlp: Path) -> Live:
    broken = root / "broken"
    broken.mkdir()
    (broken / "cicada.json").write_text("not json")
    grpc_port = free_port()
    cfg = f"""
[server]
grpc_port = {grpc_port}
max_request_bytes = 1_048_576
shutdown_timeout_s = 3.0
[server.auth]
inference_tokens = ["all-token", "inf-token"]
admin_tokens = ["all-token"]
[storage.http]
read_timeout_s = 30.0
[models.mlp]
uri = "{mlp}"
[models.slow]
uri = "http://127.0.0.1:{origin_port}/tiny-mlp/"
max_queue = 1
[models.broken]
uri = "{broken}"
"""
    (root / "work").mkdir()
    return Live(ServerProcess(cfg, root / "work").start(), grpc_port)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    mlp = make_model("tiny-mlp", tmp_path_factory.mktemp("grpc-models") / "tiny-mlp", seed=1)
    origin = TrickleOrigin(mlp.parent).start()
    try:
        yield mlp, origin.port
    finally:
        origin.stop()


@pytest.fixture(scope="module")
def want(models: tuple[Path, int]) -> list[Any]:
    """The plain PyTorch forward of the same weights: the oracle for every transport's answer."""
    out: list[Any] = reference(models[0], {"input_ids": torch.from_numpy(IDS)})["output"].tolist()
    return out


@pytest.fixture(scope="module")
def live(models: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    mlp, origin_port = models
    server = start(tmp_path_factory.mktemp("grpc"), origin_port, mlp)
    try:
        yield server
    finally:
        assert server.server.stop() == 0, server.server.log()[-2000:]


@pytest.mark.timeout(120)
def test_tritonclient_grpc_sync(live: Live, want: list[Any]) -> None:
    out = live.probe("triton_sync")
    assert out["live"] and out["ready"] and out["model_ready"]
    meta = out["server_metadata"]
    assert meta["name"] == "cicada-async" and "statistics" in meta["extensions"]
    assert "model_configuration" in meta["extensions"] and "binary_tensor_data" not in meta["extensions"]
    # raw_output_contents, bit for bit the plain PyTorch forward.
    assert out["infer"]["id"] == "g1"
    assert out["infer"]["output"] == want
    md = out["metadata"]
    assert md["name"] == "mlp" and md["platform"] == "pytorch"
    assert md["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": ["-1", "-1"]}]
    assert out["config"]["backend"] == "pytorch" and out["config"]["input"][0]["data_type"] == "TYPE_INT64"
    assert out["config"]["output"][0]["name"] == "output"
    assert out["status"] == {
        "unknown_model": "NOT_FOUND",
        "unknown_version": "NOT_FOUND",
        "wrong_datatype": "INVALID_ARGUMENT",
        "too_large": "RESOURCE_EXHAUSTED",  # over max_request_bytes, refused by grpc itself
        "broken_model": "INTERNAL",
        "no_token": "UNAUTHENTICATED",
        "bad_token": "UNAUTHENTICATED",
        "inference_token_on_repository": "PERMISSION_DENIED",
    }
    before, after = out["stats_before"]["inference_stats"], out["stats_after"]["inference_stats"]

    def count(stats: dict[str, Any], key: str) -> int:
        return int(stats[key].get("count", 0))  # proto3 JSON leaves zeros out

    # One infer succeeded; the wrong datatype failed; refusals before the model ran (too large,
    # no token, unknown model) are not this model's.
    assert count(after, "success") == count(before, "success") + 1
    assert count(after, "fail") == count(before, "fail") + 1
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert count(after, key) == count(before, key) + 1, key
    assert int(out["stats_after"]["execution_count"]) == int(out["stats_before"].get("execution_count", 0)) + 1
    assert int(out["stats_after"]["last_inference"]) > 0
    assert {s["name"] for s in out["all_stats"]} == {"mlp", "slow", "broken"}
    assert {m["name"]: m["state"] for m in out["index_after_unload"]}["mlp"] == "UNAVAILABLE"
    assert {m["name"]: m["state"] for m in out["index_after_load"]}["mlp"] == "READY"


@pytest.mark.timeout(120)
def test_tritonclient_grpc_aio_and_http_statistics_agree(live: Live, want: list[Any]) -> None:
    out = live.probe("triton_aio")
    assert out["live"] and out["ready"]
    assert out["output"] == want
    assert live.http_output() == want
    assert int(out["stats_after"]["inference_count"]) == int(out["stats_before"].get("inference_count", 0)) + 1
    assert out["config"]["name"] == "mlp"
    # Both transports count into one set of statistics: HTTP sees the gRPC requests.
    c = httpclient.InferenceServerClient(f"127.0.0.1:{live.server.port}")
    try:
        http_stats = c.get_inference_statistics("mlp", headers=ALL)["model_stats"][0]
        assert http_stats["inference_count"] >= int(out["stats_after"]["inference_count"]) + 1  # + http_output()
        config = c.get_model_config("mlp", headers=ALL)
        assert config["max_batch_size"] == 0 and config["input"][0]["dims"] == [-1, -1]
    finally:
        c.close()


@pytest.mark.timeout(120)
def test_kserve_grpc_client(live: Live, want: list[Any]) -> None:
    out = live.probe("kserve")
    assert out["live"] and out["ready"] and out["model_ready"]
    for mode in ("raw", "contents"):  # raw_input_contents and typed int64_contents
        assert out[mode] == {"id": f"k-{mode}", "output": want}, mode
    assert out["unknown_model"] == "NOT_FOUND"


@pytest.mark.timeout(120)
def test_overload_and_deadline_status_codes(live: Live) -> None:
    out = live.probe("triton_overload")
    assert out == {"rider": "DEADLINE_EXCEEDED",  # the client's own deadline; the load goes on
                   "queued_then_displaced": "UNAVAILABLE", "queue_full": "UNAVAILABLE", "deadline": "DEADLINE_EXCEEDED"}


@pytest.mark.timeout(120)
def test_sigterm_drain_over_grpc(models: tuple[Path, int], tmp_path: Path) -> None:
    """SIGTERM: ServerReady turns false, new calls are UNAVAILABLE, the call riding a cold start
    is answered UNAVAILABLE at the drain deadline, and the process exits 0."""
    mlp, origin_port = models
    live = start(tmp_path, origin_port, mlp)
    probe = subprocess.Popen([sys.executable, "-m", "tests.service.grpc_probe", "triton_drain", str(live.grpc_port),
                              str(live.server.port)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
        live.server.signal(signal.SIGTERM)
        time.sleep(0.3)
        stdout, stderr = probe.communicate("go\n", timeout=60)
        assert probe.returncode == 0, stderr[-3000:]
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out == {"live": True, "ready": False, "new_infer": "UNAVAILABLE", "rider": "UNAVAILABLE"}
        assert live.server.wait(30) == 0
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait(10)
        live.server.stop()
