"""The server builds each configured model's skeleton ahead of its first request."""

from __future__ import annotations

import asyncio
import logging

from cicada_async.engine.runtime import Engine
from cicada_async.service.config import Config, ModelConfig
from cicada_async.service.metrics import Metrics
from cicada_async.service.repository import Repository

from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference


async def test_configured_models_get_a_skeleton_ahead(model_dirs, tmp_path, caplog):
    d = model_dirs["tiny-gpt2"]
    cfg = Config(models={"g": ModelConfig("g", str(d)), "gone": ModelConfig("gone", str(tmp_path / "gone"))})
    with caplog.at_level(logging.WARNING):
        async with Engine(plan_files=False) as engine:
            repo = Repository(engine, cfg, Metrics())
            inst = repo.get("g").instance
            assert not inst._ready.ready  # non-blocking: the repository did not wait for it
            for _ in range(600):  # behind the engine's warm imports, at low priority
                if inst._ready.ready:
                    break
                await asyncio.sleep(0.05)
            assert inst._ready.ready, "the configured model's skeleton was not built ahead"
            await repo.load("g")
            stages = {s.name for s in inst.last_timeline.spans if s.kind == "stage"}
            assert "skeleton" not in stages
            inputs = inputs_for(d)
            out = await inst.infer(inputs)
            assert repo.get("gone").instance._ready.ready is False
    assert_equal_outputs(reference(d, inputs), out)
    assert any("could not build the skeleton of gone" in r.getMessage() for r in caplog.records)
