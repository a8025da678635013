"""Faults through the real engine and server: bad model bytes, storage lost or stalled mid-load,
a forward that raises, a dead executor thread. Each ends in a clear error within the request's
deadline, leaves the other models serving, and the next request recovers.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch

from backends.memory import Faults, MemoryBackend
from cicada_async.service.config import Config, ModelConfig, ServerConfig
from cicada_async.engine.runtime import Engine
from protocols import v2
from tests.fixtures.server import live_server
from tests.fixtures.helpers import inputs_for, reference


def _config(models: dict[str, str], **server: Any) -> Config:
    return Config(server=ServerConfig(host="127.0.0.1", port=0, **server),
                  models={n: ModelConfig(name=n, uri=u) for n, u in models.items()})


async def _infer(s: aiohttp.ClientSession, model: str, inputs: dict[str, torch.Tensor],
                 timeout_us: int | None = None) -> tuple[int, Any, float]:
    params = {"timeout": timeout_us} if timeout_us else None
    body, hl = v2.encode_request(inputs, binary=True, parameters=params)
    t0 = time.monotonic()
    headers = {v2.HEADER_LENGTH: str(hl)} if hl is not None else {}
    async with s.post(f"/v2/models/{model}/infer", data=body, headers=headers,
                      params={"binary_data_output": "true"}) as r:
        raw = await r.read()
        took = time.monotonic() - t0
        if r.status != 200:
            return r.status, (await r.json())["error"], took
        hl_out = r.headers.get(v2.HEADER_LENGTH)
        return 200, v2.decode_response(raw, int(hl_out) if hl_out else None)["outputs"], took


def _assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    common = set(got) & set(want)
    assert common, (got.keys(), want.keys())
    for k in common:
        assert torch.equal(got[k], want[k].to(got[k].dtype)), k


async def _ready(s: aiohttp.ClientSession) -> int:
    async with s.get("/v2/health/ready") as r:
        return r.status


# -- never unpickle -------------------------------------------------------------------------------
async def test_pickle_renamed_is_500_and_server_keeps_serving(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    shutil.copytree(model_dirs["tiny-mlp"], evil)
    marker = tmp_path / "pwned"
    # A pickle whose unpickling would create a file: it must never run.
    import pickle

    class Boom:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    (evil / "model.safetensors").write_bytes(pickle.dumps({"w": Boom()}))
    good = model_dirs["tiny-mlp"]
    inputs = inputs_for(good)
    with live_server(_config({"evil": str(evil), "good": str(good)})) as server:
        async with aiohttp.ClientSession(server.http_url) as s:
            for _ in range(2):  # the failure is repeatable, not a hang the second time
                status, err, took = await _infer(s, "evil", inputs)
                assert status == 500 and "model.safetensors" in err and "header length" in err, err
                assert took < 10
            assert await _ready(s) == 200
            async with s.get("/v2/models/evil/ready") as r:
                assert r.status == 503
            status, out, _ = await _infer(s, "good", inputs)
            assert status == 200
            _assert_exact(out, reference(good, inputs))
    assert not marker.exists()


# -- a forward that raises ----------------------------------------------------------------------
async def test_forward_exception_leaves_others_serving(model_dirs: dict[str, Path]) -> None:
    mlp, gpt2 = model_dirs["tiny-mlp"], model_dirs["tiny-gpt2"]
    with live_server(_config({"mlp": str(mlp), "gpt2": str(gpt2)})) as server:
        async with aiohttp.ClientSession(server.http_url) as s:
            ok_in = inputs_for(mlp)
            assert (await _infer(s, "mlp", ok_in))[0] == 200  # loaded, metadata known
            bad = {"input_ids": torch.full((1, 4), 10_000, dtype=torch.int64)}  # past the vocabulary
            status, err, _ = await _infer(s, "mlp", bad)
            assert status == 500 and "index" in err.lower(), err
            for name, d in (("gpt2", gpt2), ("mlp", mlp)):
                inputs = inputs_for(d)
                status, out, _ = await _infer(s, name, inputs)
                assert status == 200, out
                _assert_exact(out, reference(d, inputs))
            assert await _ready(s) == 200


# -- storage lost or stalled mid-load -------------------------------------------------------------
@pytest.fixture
def memory_faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Faults]]:
    """memory://<dir> models whose reads follow box["faults"] (set between requests)."""
    box = {"faults": Faults()}

    def from_uri(cls: type, uri: str, settings: dict[str, Any]) -> MemoryBackend:
        return MemoryBackend.from_dir(uri.removeprefix("memory://"), box["faults"])

    monkeypatch.setattr(MemoryBackend, "from_uri", classmethod(from_uri))
    yield box


async def test_storage_lost_mid_load(model_dirs: dict[str, Path], memory_faults: dict[str, Faults]) -> None:
    d = model_dirs["tiny-gpt2"]
    # 64 KiB reads: the failure comes after about half the weights have landed.
    memory_faults["faults"] = Faults(fail_after_bytes=300_000, delay_s=0.01)
    inputs = inputs_for(d)
    cfg = _config({"m": f"memory://{d}", "other": str(model_dirs["tiny-mlp"])})
    with live_server(cfg, engine_factory=lambda c: Engine(storage=c.storage, read_bytes=64 << 10)) as server:
        async with aiohttp.ClientSession(server.http_url) as s:
            results = await asyncio.gather(*(_infer(s, "m", inputs, timeout_us=10_000_000) for _ in range(6)))
            for status, err, took in results:
                assert status == 500 and "injected failure" in err, err
                # The failure comes after ~300 kB at 10 ms per 64 KiB read (~50 ms): answered at
                # once, not at the 10 s deadline (which would be a 504 anyway).
                assert took < 1.0, took
            assert server.sync(lambda: server.repo.get("m").state) == "unloaded"
            async with s.post("/v2/repository/index") as r:
                row = next(x for x in await r.json() if x["name"] == "m")
                assert row["state"] == "UNAVAILABLE" and "injected failure" in row["reason"]
            other = inputs_for(model_dirs["tiny-mlp"])
            assert (await _infer(s, "other", other))[0] == 200
            memory_faults["faults"] = Faults()  # storage is back
            status, out, _ = await _infer(s, "m", inputs)
            assert status == 200
            _assert_exact(out, reference(d, inputs))
            assert server.sync(lambda: server.repo.get("m").instance.cold_starts) == 1


async def test_storage_stall_answers_within_deadline_then_recovers(
        model_dirs: dict[str, Path], memory_faults: dict[str, Faults]) -> None:
    d = model_dirs["tiny-gpt2"]
    memory_faults["faults"] = Faults(stall_after_bytes=300_000)
    inputs = inputs_for(d)
    cfg = _config({"m": f"memory://{d}"})
    engine = lambda c: Engine(storage=c.storage, read_timeout_s=2.0, read_bytes=64 << 10)  # noqa: E731
    with live_server(cfg, engine_factory=engine) as server:
        async with aiohttp.ClientSession(server.http_url) as s:
            # The first request rides the (stalled) cold start, the others wait in the heap.
            results = await asyncio.gather(*(_infer(s, "m", inputs, timeout_us=500_000) for _ in range(4)))
            for status, err, took in results:
                assert status == 504 and "timeout" in err, (status, err)
                assert took < 1.5, took  # deadline 0.5 s: nobody waits for the stalled load
            # The load itself gives up after read_timeout_s and the model returns to unloaded.
            server.wait_until(lambda: server.repo.get("m").state == "unloaded"
                              and server.repo.get("m").loading is None, timeout=15)
            assert server.sync(lambda: server.repo.get("m").instance.last_error)  # the load's own error
            memory_faults["faults"] = Faults()
            status, out, _ = await _infer(s, "m", inputs, timeout_us=20_000_000)
            assert status == 200, out
            _assert_exact(out, reference(d, inputs))


# -- dead executor --------------------------------------------------------------------------------
async def test_dead_executor_is_noticed_and_restarted(model_dirs: dict[str, Path]) -> None:
    d = model_dirs["tiny-mlp"]
    inputs = inputs_for(d)
    want = reference(d, inputs)
    with live_server(_config({"m": str(d)}, keep_alive_check_s=0.3)) as server:
        engine = server.plane.engine
        async with aiohttp.ClientSession(server.http_url) as s:
            status, out, _ = await _infer(s, "m", inputs)
            assert status == 200
            server.sync(lambda: engine.executor.stop(5.0))  # what a crashed thread looks like
            assert await _ready(s) == 503
            status, err, _ = await _infer(s, "m", inputs)
            assert status == 503 and "restarting" in err
            end = time.monotonic() + 10
            while await _ready(s) != 200:
                assert time.monotonic() < end, "executor not restarted"
                await asyncio.sleep(0.05)
            assert server.sync(lambda: server.plane.state.executor_restarts) == 1
            status, out, _ = await _infer(s, "m", inputs)
            assert status == 200
            _assert_exact(out, want)
