"""The memory budget holds: loads are sized before they fetch, reserved, and refused at once
when they can never fit; concurrent loads wait for room instead of overrunning it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cicada_async.service.config import Config, ModelConfig
from tests.fixtures.helpers import reference
from tests.fixtures.server import live_server, real_config

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:.*geventhttpclient.*")]

NAMES = ("tiny-gpt2", "tiny-bert")


def _infer(url: str, name: str) -> np.ndarray:
    c = httpclient.InferenceServerClient(url, network_timeout=60)
    try:
        inp = httpclient.InferInput("input_ids", [1, 8], "INT64")
        inp.set_data_from_numpy(np.arange(8, dtype=np.int64).reshape(1, 8))
        res = c.infer(name, [inp])
        return res.as_numpy(res.get_response()["outputs"][0]["name"])
    finally:
        c.close()


def _assert_reference(model_dir: Path, got: np.ndarray) -> None:
    want = next(iter(reference(model_dir, {"input_ids": torch.arange(8).reshape(1, 8)}).values()))
    assert np.array_equal(got, want.numpy()), model_dir.name


# A causal LM is charged its KV cache budget on top of its weights (tiny-gpt2 is one): a small
# one here, so that the budgets below stay about the weights.
KV = 64 << 10
LMS = {"tiny-gpt2"}


def _sizes(model_dirs: dict[str, Path]) -> dict[str, int]:
    """What each model is charged: its weights (fp32 files, served as they are) and, for a causal
    LM, the KV cache budget its config gives it."""
    return {n: sum(p.stat().st_size for p in model_dirs[n].glob("*.safetensors")) + (KV if n in LMS else 0)
            for n in NAMES}


def _config(model_dirs: dict[str, Path], **server: object) -> Config:
    cfg = real_config(model_dirs, NAMES, **server)
    for n in NAMES:
        cfg.models[n] = dataclasses.replace(cfg.models[n], kv_cache_bytes=KV)
    return cfg


def test_a_load_larger_than_the_budget_fails_at_once_without_fetching(model_dirs: dict[str, Path]) -> None:
    cfg = real_config(model_dirs, NAMES, memory_budget_bytes=10_000)
    with live_server(cfg) as s:
        t = time.monotonic()
        with pytest.raises(InferenceServerException) as e:
            _infer(s.url, "tiny-gpt2")
        assert time.monotonic() - t < 5
        assert str(e.value.status()) == "503"
        assert "more than the whole memory budget (10000 bytes)" in e.value.message()
        inst = s.repo.get("tiny-gpt2").instance
        assert inst.cold_starts == 0 and inst.state == "unloaded" and inst.last_timeline is None
        c = httpclient.InferenceServerClient(s.url)
        assert c.is_server_ready()
        c.close()


def test_concurrent_cold_starts_wait_for_room_instead_of_overrunning(model_dirs: dict[str, Path]) -> None:
    sizes = _sizes(model_dirs)
    budget = max(sizes.values()) + min(sizes.values()) // 2  # one at a time
    cfg = _config(model_dirs, memory_budget_bytes=budget, keep_alive_check_s=0.05)
    for n in NAMES:  # a slow origin: both loads are in flight together if nothing stops them
        cfg.models[n] = dataclasses.replace(cfg.models[n], uri=f"memory://{model_dirs[n]}")
    cfg = dataclasses.replace(cfg, storage={"memory": {"delay_s": 0.1}})
    with live_server(cfg) as s, concurrent.futures.ThreadPoolExecutor(2) as pool:
        s.wait_until(lambda: all(s.repo.get(n).instance.weight_bytes for n in NAMES), timeout=30)
        futs = [pool.submit(_infer, s.url, n) for n in NAMES]
        worst = 0
        while not all(f.done() for f in futs):
            worst = max(worst, s.sync(s.repo.resident_bytes))
            time.sleep(0.01)
        for n, f in zip(NAMES, futs):  # the answers themselves: the plain PyTorch forward's
            _assert_reference(model_dirs[n], f.result())
        assert 0 < worst <= budget
        evicted = [n for n in NAMES if s.repo.get(n).state == "unloaded"]
        assert len(evicted) == 1, "the second load made room by evicting the first"


def test_a_budget_held_by_a_busy_model_is_refused_after_the_wait(model_dirs: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cicada_async.service import repository

    monkeypatch.setattr(repository, "BUDGET_WAIT_S", 0.5)
    sizes = _sizes(model_dirs)
    cfg = _config(model_dirs, memory_budget_bytes=max(sizes.values()) + 100)
    cfg.models["tiny-gpt2"] = ModelConfig(name="tiny-gpt2", uri=f"memory://{model_dirs['tiny-gpt2']}", kv_cache_bytes=KV)
    cfg = dataclasses.replace(cfg, storage={"memory": {"delay_s": 1.0}})  # gpt2 loads for seconds
    with live_server(cfg) as s, concurrent.futures.ThreadPoolExecutor(1) as pool:
        s.wait_until(lambda: all(s.repo.get(n).instance.weight_bytes for n in NAMES), timeout=30)
        slow = pool.submit(_infer, s.url, "tiny-gpt2")
        s.wait_until(lambda: s.repo.get("tiny-gpt2").state == "loading", timeout=10)
        with pytest.raises(InferenceServerException) as e:
            _infer(s.url, "tiny-bert")
        assert str(e.value.status()) == "503" and "held by models in use: tiny-gpt2" in e.value.message()
        assert s.repo.get("tiny-bert").instance.cold_starts == 0
        assert slow.result().size > 0


# -- the process's real memory, not the repository's own count ----------------------------------------
MLP = {"vocab": 8192, "dim": 1024, "hidden": 256}  # 34 MiB of float32 weights


def _mlp(d: Path, seed: int) -> Path:
    from safetensors.torch import save_model

    from cicada_async.models.plain import TiedMLP

    d.mkdir()
    torch.manual_seed(seed)
    save_model(TiedMLP(**MLP).eval(), str(d / "model.safetensors"))
    (d / "cicada.json").write_text(json.dumps({"factory": "cicada_async.models.plain:TiedMLP", "kwargs": MLP,
                                               "inputs": {"input_ids": {"shape": [-1, -1], "dtype": "int64"}}}))
    return d


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_real_rss_stays_within_the_budget(tmp_path: Path) -> None:
    """Peak process RSS over two competing cold starts against budget + the idle baseline.

    The baseline is a server that has done one cold start already (of a third model, then
    unloaded): a process's first load imports code that stays for its life (transformers'
    loss, image and pytorch utilities, torch.onnx: about 30 MiB of RssAnon, and the first
    forward's code pages), and the engine's background import of the model libraries goes on
    for seconds after start (RssAnon grew 183 -> 249 MiB in 5 s of an idle engine). Measured
    from an idle server 2 s after start, as this test did, those one-time costs (about 100 MiB
    here) read as an overrun of the budget; every later load of these models costs exactly its
    mapped file (34 MiB) and gives it back at unload.
    """
    from protocols.serving import Priority

    dirs = {"a": _mlp(tmp_path / "a", 1), "b": _mlp(tmp_path / "b", 2), "w": _mlp(tmp_path / "w", 3)}
    size = (dirs["a"] / "model.safetensors").stat().st_size
    budget = size + size // 4  # one at a time
    cfg = real_config(dirs, ("a", "b", "w"), memory_budget_bytes=budget, keep_alive_check_s=0.05)
    with live_server(cfg) as s, concurrent.futures.ThreadPoolExecutor(2) as pool:
        s.wait_until(lambda: all(s.repo.get(n).instance.weight_bytes for n in dirs), timeout=30)
        first = _infer(s.url, "w")  # the process's first cold start (checked after: the eager
        # reference's own allocations must not be in the baseline)
        s.call(lambda: s.repo.unload("w"))
        executor = s.plane.engine.executor  # type: ignore[attr-defined]  # the real engine's
        # Every job queued before this one ran: the warm imports and the skeletons' refills.
        s.call(lambda: executor.run(lambda: None, priority=Priority.BACKGROUND))
        base = peak = _rss()
        futs = [pool.submit(_infer, s.url, n) for n in ("a", "b")]
        while not all(f.done() for f in futs):
            peak = max(peak, _rss())
            time.sleep(0.005)
        for n, f in zip(("a", "b"), futs):
            _assert_reference(dirs[n], f.result())
        _assert_reference(dirs["w"], first)
    slack = 16 << 20  # allocator and request buffers
    assert peak - base <= budget + slack, f"RSS grew {(peak - base) >> 20} MiB, budget {budget >> 20} MiB"
