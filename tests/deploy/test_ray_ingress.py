"""The Ray ingress without a cluster: it imports no torch, and the facts ``ray_wire`` spells out
instead of importing them from torch-importing modules agree with their sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import ray  # noqa: F401
except ImportError:  # the test extra installs ray[serve]; in CI a missing ray is an error
    if os.environ.get("CI"):
        raise
    pytest.skip("ray[serve] is not installed (pip install -e '.[test]')", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]

# Ray imports the ingress's module to unpickle its class, then __init__ and a few requests run.
INGRESS = """
import asyncio, sys, orjson
from starlette.requests import Request
from cicada_async.service.ray_ingress import CicadaIngress
from cicada_async.service.ray_wire import CicadaArgs

ingress = CicadaIngress.func_or_class(None, CicadaArgs(model_repository=sys.argv[1]))

async def call(method, path, body=b""):
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"", "root_path": ""}
    r = await ingress(Request(scope, receive))
    return r.status_code, orjson.loads(r.body)

async def main():
    assert await call("GET", "/v2") == (200, {"name": "cicada-async", "version": "0.1.0", "extensions": [
        "binary_tensor_data", "model_repository", "schedule_policy", "statistics", "model_configuration"]})
    assert await call("GET", "/v1/models") == (200, {"object": "list", "data": [
        {"id": "m", "object": "model", "created": 0, "owned_by": "cicada-async"}]})
    status, doc = await call("POST", "/v1/completions", b'{"model": "nope", "prompt": "x"}')
    assert status == 404 and doc["error"]["code"] == "model_not_found", doc
    status, doc = await call("POST", "/openai/v1/chat/completions", b'{"messages": []}')
    assert status == 400 and doc["error"]["param"] == "model", doc
    status, doc = await call("POST", "/v1/completions", b"{")
    assert status == 400 and doc["error"]["type"] == "invalid_request_error", doc
    status, doc = await call("POST", "/v2/models/nope/generate", b"{}")
    assert status == 404 and doc == {"error": "unknown model 'nope'"}, doc
    status, doc = await call("GET", "/metrics")  # a replica's metrics: which one must be named
    assert status == 400 and "model=NAME" in doc["error"], doc

asyncio.run(main())
assert "torch" not in sys.modules, "the ingress imported torch"
"""


def test_the_ingress_answers_without_torch(tmp_path: Path) -> None:
    from cicada_async.models.catalogue import make_model

    make_model("tiny-mlp", tmp_path / "m")
    proc = subprocess.run([sys.executable, "-c", INGRESS, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_what_ray_wire_spells_out_agrees_with_its_source() -> None:
    from cicada_async.service import config, dataplane, http_auth, metrics, openai_api, openai_wire, ray_wire, sse
    from cicada_async.service.config import AuthConfig
    from protocols import v2

    assert config.V2_DATATYPES == set(v2.DATATYPES)
    assert (ray_wire.SERVER_NAME, ray_wire.SERVER_VERSION, ray_wire.EXTENSIONS) == (
        dataplane.SERVER_NAME, dataplane.SERVER_VERSION, dataplane.EXTENSIONS)
    assert ray_wire.OPENAI_PREFIXES == openai_api.PREFIXES and ray_wire.DONE == sse.DONE
    assert ray_wire.METRICS_TYPE == metrics.CONTENT_TYPE
    assert ray_wire.SERVER_NAME == openai_api.OWNER
    for status in (400, 401, 403, 404, 413, 429, 500, 503):
        assert ray_wire.openai_error(status, "m", "p", "c") == openai_wire.error(status, "m", "p", "c")
    paths = ["/v2/health/live", "/v2/health/ready", "/v2", "/v2/models", "/v2/models/m/infer", "/metrics",
             "/v2/repository", "/v2/repository/index", "/v2/repository/models/m/load", "/v1/completions",
             "/openai/v1/models", "/v2/models/m/generate_stream"]
    for protect in (False, True):
        auth = AuthConfig(inference_tokens=["t"], protect_metrics=protect)
        assert [ray_wire.scope_of(p, auth) for p in paths] == [http_auth.scope_of(p, auth) for p in paths]



# A model replica's start (ray_replica) without Ray: building it imports no torch; a request
# that arrives before the data plane is up starts reading its model's weights and waits; then
# the model answers, and the replica never imported aiohttp (service/server.py does).
REPLICA = """
import asyncio, sys
from cicada_async.service.ray_replica import ReplicaStart
from cicada_async.service.ray_wire import CicadaArgs, load_settings

async def main():
    start = ReplicaStart(load_settings(CicadaArgs(model_repository=sys.argv[1])), 1)
    assert "torch" not in sys.modules, "building the replica's start imported torch"
    dp = await start.data_plane("m")
    assert list(start.prefetched) == ["m"], start.prefetched
    import torch
    from safetensors.torch import load_file
    from cicada_async.models.plain import TiedMLP
    from cicada_async.service.stats import Outcome
    from protocols import v2
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    body, hl = v2.encode_request({"input_ids": ids})
    out = await dp.infer(dp.admit("m"), v2.decode_request(body, hl), Outcome())
    ref = TiedMLP(vocab=256, dim=32, hidden=64)  # catalogue's tiny-mlp, loaded as plain PyTorch
    keys = ref.load_state_dict(load_file(sys.argv[1] + "/m/model.safetensors"), strict=False)
    assert set(keys.missing_keys) <= {"out.weight"} and not keys.unexpected_keys, keys  # tied: stored once
    with torch.inference_mode():
        want = ref(ids)
    (got,) = out.values()
    assert torch.equal(got, want), (got - want).abs().max()
    assert torch.get_num_threads() == 1
    assert "aiohttp" not in sys.modules, "the replica imported aiohttp"
    await start.close()

asyncio.run(main())
"""


def test_a_replica_is_ready_before_torch_and_answers_once_started(tmp_path: Path) -> None:
    from cicada_async.models.catalogue import make_model

    make_model("tiny-mlp", tmp_path / "m")
    proc = subprocess.run([sys.executable, "-c", REPLICA, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_replica_builds_the_engine_cicada_serve_builds(tmp_path: Path) -> None:
    from cicada_async.engine.runtime import Engine
    from cicada_async.service.config import Config
    from cicada_async.service.ray_replica import engine_factory
    from cicada_async.service.server import default_engine_factory

    for threads, serialize in ((None, False), (1, True)):
        config = Config(model_repository=tmp_path)
        config.server.torch_threads, config.server.serialize_loads = threads, serialize
        config.cache.plan_dir = tmp_path / "plans"
        ours, theirs = engine_factory(config), default_engine_factory(config)
        assert isinstance(ours, Engine) and isinstance(theirs, Engine)
        for attr in ("every_core_when_idle", "node_cache", "storage", "shared", "warm_imports", "read_bytes",
                     "load_timeout_s"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        assert vars(ours.plans) == vars(theirs.plans) and vars(ours.fetch) == vars(theirs.fetch)
