"""The service over the REAL engine and zoo models, through tritonclient.

Outputs are compared exactly with a plain PyTorch load of the same weights.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cicada_async.bench.pagecache import make_cold
from cicada_async.engine.resident import RESIDENT_FRACTION
from cicada_async.service.config import ModelConfig
from cicada_async.service.metrics import parse_text
from protocols.serving import Inputs, Priority
from tests.fixtures.server import LiveServer, live_server, real_config, with_model
from tests.fixtures.triton import get_text

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*geventhttpclient.*"),
]

httpclient = pytest.importorskip("tritonclient.http")
aioclient = pytest.importorskip("tritonclient.http.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

NAMES = ("tiny-mlp", "tiny-gpt2", "tiny-bert")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cicada_async.models.catalogue import make_model

    root = tmp_path_factory.mktemp("zoo")
    return {n: make_model(n, root / n) for n in NAMES}


@pytest.fixture(scope="module")
def reference(zoo: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """Plain PyTorch loads of the same weights (no cicada code on this path)."""
    from safetensors.torch import load_file
    import transformers

    models: dict[str, torch.nn.Module] = {}
    for name, path in zoo.items():
        if (path / "cicada.json").exists():
            spec = json.loads((path / "cicada.json").read_text())
            module_name, _, attr = spec["factory"].partition(":")
            model = getattr(__import__(module_name, fromlist=[attr]), attr)(**spec["kwargs"])
            model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        else:
            cfg = json.loads((path / "config.json").read_text())
            model = getattr(transformers, cfg["architectures"][0]).from_pretrained(str(path))
        models[name] = model.eval()
    return models


def ref_outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return {"output": out.numpy()}
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.fixture
def server(zoo: dict[str, Path]) -> Iterator[LiveServer]:
    with live_server(real_config(zoo, NAMES)) as s:
        yield s


def ids_input(ids: np.ndarray) -> Any:
    inp = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    return inp


def ids(seed: int, batch: int = 1, seq: int = 8, vocab: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int64)


@pytest.mark.parametrize("name", NAMES)
def test_cold_then_warm_matches_plain_pytorch(server: LiveServer, reference: dict[str, Any], name: str) -> None:
    c = httpclient.InferenceServerClient(server.url)
    x = ids(1, batch=2)
    want = ref_outputs(reference[name], {"input_ids": torch.from_numpy(x)})
    for _ in range(2):  # cold (layer-gated forward), then warm (plain forward)
        res = c.infer(name, [ids_input(x)])
        for key, value in want.items():
            np.testing.assert_array_equal(res.as_numpy(key), value, err_msg=key)
    assert server.repo.get(name).instance.cold_starts == 1
    md = c.get_model_metadata(name)
    assert md["inputs"][0]["name"] == "input_ids" and {o["name"] for o in md["outputs"]} >= set(want)
    c.close()


def test_single_flight_50_concurrent_cold(server: LiveServer, reference: dict[str, Any]) -> None:
    async def burst() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(server.url, conn_limit=64) as c:
            async def one(i: int) -> np.ndarray:
                inp = aioclient.InferInput("input_ids", [1, 8], "INT64")
                inp.set_data_from_numpy(ids(i))
                return (await c.infer("tiny-gpt2", [inp], priority=1 + i % 3)).as_numpy("logits")
            return await asyncio.gather(*(one(i) for i in range(50)))

    # Evicted first where the kernel lets it: resident files load without a fetch
    # (engine/resident.py). Pages that a live mapping in this process still holds (an earlier
    # test's load of the same files) cannot be dropped; mincore says which case this is.
    cold = make_cold(Path(server.repo.get("tiny-gpt2").instance.uri))
    outs = asyncio.run(burst())
    inst = server.repo.get("tiny-gpt2").instance
    assert inst.cold_starts == 1
    for i, got in enumerate(outs):
        want = ref_outputs(reference["tiny-gpt2"], {"input_ids": torch.from_numpy(ids(i))})["logits"]
        np.testing.assert_array_equal(got, want)
    text = server.call(lambda: get_text(server, "/metrics"))
    m = parse_text(text)
    assert m['cicada_cold_starts_total{model="tiny-gpt2",outcome="success"}'] == 1
    assert m['nv_inference_request_success{model="tiny-gpt2",version="1"}'] == 50
    fetched = m.get('cicada_bytes_fetched_total{model="tiny-gpt2"}', 0.0)
    if cold.fraction >= RESIDENT_FRACTION:
        assert fetched == 0, "a resident model's one load fetched bytes"
    else:
        assert fetched >= inst.nbytes  # + header, alignment: one fetch for the 50 requests


def test_priority_order_with_real_engine(server: LiveServer) -> None:
    c = httpclient.InferenceServerClient(server.url)
    c.load_model("tiny-mlp")
    inst = server.repo.get("tiny-mlp").instance
    order: list[int] = []
    original = inst.infer

    async def recording(inputs: Inputs, *, priority: Priority) -> dict[str, torch.Tensor]:
        order.append(priority.level)
        return await original(inputs, priority=priority)

    inst.infer = recording  # type: ignore[method-assign]

    def send(priority: int) -> Any:
        cc = httpclient.InferenceServerClient(server.url)
        try:
            return cc.infer("tiny-mlp", [ids_input(ids(priority))], priority=priority)
        finally:
            cc.close()

    server.sync(server.scheduler.hold)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futs = []
        for n, prio in enumerate([9, 8, 1]):
            futs.append(pool.submit(send, prio))
            server.wait_until(lambda n=n: server.scheduler.queued("tiny-mlp") == n + 1)
        server.sync(server.scheduler.release)
        for f in futs:
            f.result(30)
    assert order == [1, 8, 9]
    c.close()


def test_keep_alive_and_memory_budget_real(zoo: dict[str, Path]) -> None:
    # tiny-gpt2 is a causal LM: charged its KV cache budget too, a small one here.
    cfg = with_model(real_config(zoo, NAMES, keep_alive_check_s=0.05), "tiny-gpt2", kv_cache_bytes=64 << 10)
    with live_server(cfg) as s:  # learn the sizes (what each model is charged)
        c = httpclient.InferenceServerClient(s.url)
        for n in NAMES:
            c.load_model(n)
        sizes = {n: s.repo.get(n).resident_bytes for n in NAMES}
        c.close()
    assert sizes["tiny-gpt2"] == s.repo.get("tiny-gpt2").instance.nbytes + (64 << 10)
    budget = sizes["tiny-gpt2"] + sizes["tiny-bert"] + sizes["tiny-mlp"] // 2
    cfg = real_config(zoo, NAMES, keep_alive_check_s=0.05, memory_budget_bytes=budget)
    cfg = with_model(cfg, "tiny-gpt2", kv_cache_bytes=64 << 10)
    cfg.models["tiny-mlp"] = ModelConfig(name="tiny-mlp", uri=str(zoo["tiny-mlp"]), keep_alive_s=0.3)
    with live_server(cfg) as s:
        c = httpclient.InferenceServerClient(s.url)
        c.infer("tiny-mlp", [ids_input(ids(0))])
        s.wait_until(lambda: s.repo.get("tiny-mlp").state == "unloaded", timeout=10)  # keep-alive
        c.infer("tiny-gpt2", [ids_input(ids(0))])
        c.infer("tiny-bert", [ids_input(ids(0))])
        c.infer("tiny-gpt2", [ids_input(ids(1))])  # bert is now the least recently used
        c.infer("tiny-mlp", [ids_input(ids(0))])  # over budget: evict bert
        s.wait_until(lambda: s.repo.get("tiny-bert").state == "unloaded", timeout=10)
        assert s.repo.get("tiny-gpt2").state == "ready"
        assert s.sync(s.repo.resident_bytes) <= budget
        text = s.call(lambda: get_text(s, "/metrics"))
        assert 'cicada_evictions_total{model="tiny-bert",reason="memory_budget"} 1' in text
        assert 'cicada_evictions_total{model="tiny-mlp",reason="keep_alive"} 1' in text
        c.close()


def test_bad_input_refused_before_engine_once_metadata_known(server: LiveServer) -> None:
    c = httpclient.InferenceServerClient(server.url)
    c.load_model("tiny-mlp")
    bad = httpclient.InferInput("input_ids", [1, 4], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as e:
        c.infer("tiny-mlp", [bad])
    assert str(e.value.status()) == "400" and "INT64" in e.value.message()
    c.close()


def test_broken_model_dir_is_500_and_ready_503(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cfg = real_config({"broken": tmp_path / "broken"}, ("broken",))
    with live_server(cfg) as s:
        c = httpclient.InferenceServerClient(s.url)
        with pytest.raises(InferenceServerException) as e:
            c.infer("broken", [ids_input(ids(0))])
        assert str(e.value.status()) == "500"
        assert not c.is_model_ready("broken")
        assert c.is_server_ready()
        c.close()
