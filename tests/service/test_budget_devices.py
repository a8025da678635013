"""What the memory budget charges (review-3 C-7/G-7, service side): each device its own bytes, and
a causal LM its KV cache budget on top of its weights.

The repository is driven with the test double engine; the oracle is the arithmetic of the sizes
the test gives the doubles, not the repository's own accounting.
"""

from __future__ import annotations

import pytest

from cicada_async.service.config import Config, ModelConfig, ServerConfig
from cicada_async.service.metrics import Metrics
from cicada_async.service.repository import Repository
from protocols.generation import GenerationStats
from tests.fixtures.server import FakeEngine, FakeInstance

pytestmark = pytest.mark.timeout(30)


class DeviceInstance(FakeInstance):
    """A double whose loaded weights sit on its configured device, sized before it loads."""

    async def size_hint(self) -> int | None:
        return self.engine.model_bytes

    @property
    def device_bytes(self) -> dict[str, int]:
        return {self.options.device: self.nbytes} if self.nbytes and self.state == "ready" else {}


class LMInstance(FakeInstance):
    """A causal LM double: its KV cache budget is ``kv`` bytes."""

    kv = 0

    @property
    def generation_stats(self) -> GenerationStats:
        return GenerationStats(running=0, waiting=0, kv_cache_bytes_used=0, kv_cache_bytes_budget=self.kv)

    async def size_hint(self) -> int | None:
        return self.engine.model_bytes  # its weights, known before the load (as the engine's)


def _repo(engine: FakeEngine, budget: int, devices: dict[str, str]) -> Repository:
    models = {n: ModelConfig(name=n, uri=f"mem://{n}", device=d, keep_alive_s=None) for n, d in devices.items()}
    cfg = Config(server=ServerConfig(host="127.0.0.1", port=0, memory_budget_bytes=budget), models=models)
    return Repository(engine, cfg, Metrics())


async def test_a_gpu_model_does_not_evict_cpu_models_from_the_host_budget() -> None:
    engine = FakeEngine(load_s=0, model_bytes=1000)
    for n, d in (("host", "cpu"), ("gpu", "cuda:0")):
        engine.instances[n] = DeviceInstance(engine, n, f"mem://{n}", ModelOptionsFor(d))
    repo = _repo(engine, budget=1500, devices={"host": "cpu", "gpu": "cuda:0"})
    await repo.load("host")
    await repo.load("gpu")  # 1000 bytes on the GPU: the host budget (1000 of 1500 used) is not its
    assert repo.get("host").state == "ready", "a CUDA model's bytes were charged to the host budget"
    assert repo.resident_bytes("cpu") == 1000 and repo.resident_bytes("cuda:0") == 1000


async def test_a_causal_lm_is_charged_its_kv_cache_budget() -> None:
    engine = FakeEngine(load_s=0, model_bytes=500)
    engine.instances["lm"] = lm = LMInstance(engine, "lm", "mem://lm", ModelOptionsFor("cpu"))
    lm.kv = 600
    repo = _repo(engine, budget=1500, devices={"other": "cpu", "lm": "cpu"})
    engine.model_bytes = 1000
    await repo.load("other")  # 1000 bytes
    engine.model_bytes = 500
    # The LM holds 500 bytes of weights and up to 600 of KV cache: 1000 + 1100 > 1500, so the
    # idle model goes; counting the weights alone (1000 + 500) it would have stayed.
    await repo.load("lm")
    assert repo.get("other").state == "unloaded"
    assert repo.resident_bytes("cpu") == 500 + 600


def ModelOptionsFor(device: str):  # type: ignore[no-untyped-def]  # noqa: N802 - reads as a type
    from protocols.serving import ModelOptions

    return ModelOptions(device=device)
