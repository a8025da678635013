"""Skeletons kept ready: built ahead, handed to a cold start (no skeleton stage), kept after an
unload, and rebuilt only when the model changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cicada_async.engine.plancache import PLAN_DIR
from cicada_async.engine.runtime import Engine

from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference
from protocols.serving import Priority


def stages(inst) -> set[str]:  # type: ignore[no-untyped-def]
    return {s.name for s in inst.last_timeline.spans if s.kind == "stage"}


async def idle(engine: Engine) -> None:
    """Wait until the executor ran everything queued, the low-priority refills included."""
    await engine.executor.run(lambda: None, priority=Priority(Priority.BACKGROUND.level + 1))


def all_meta(module) -> bool:  # type: ignore[no-untyped-def]
    return all(p.is_meta for p in module.parameters())


# Families whose skeletons hold something a copy must keep: tied embeddings (gpt2, llama),
# non-persistent buffers (llama's rotary inv_freq, bert's position ids), BatchNorm statistics.
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-resnet"])
async def test_ready_skeleton_skips_the_build_and_survives_unload(model_dirs, name):
    d = model_dirs[name]
    inputs = inputs_for(d)
    async with Engine(plan_files=False) as engine:
        inst = engine.instance("m", str(d))
        await inst.prebuild()
        assert inst._ready.ready and inst._ready.builds == 1
        first = await inst.infer(inputs)
        assert "skeleton" not in stages(inst), "the cold start built a skeleton although one was ready"
        await inst.unload()
        await idle(engine)
        assert inst._ready.ready, "no skeleton was kept ready after the unload"
        second = await inst.infer(inputs)
        assert "skeleton" not in stages(inst) and inst.cold_starts == 2
        await idle(engine)
        # Two loads, one build: every later skeleton is a copy of the pristine one, which no
        # load ever touched.
        assert inst._ready.builds == 1 and inst._ready.copies == 3
        assert all_meta(inst._ready._pristine) and all_meta(inst._ready._spare)
        assert not any(p.is_meta for p in inst._model.parameters())
    assert_equal_outputs(reference(d, inputs), first)
    assert_equal_outputs(first, second)


async def test_without_prebuild_every_load_builds(model_dirs):
    d = model_dirs["tiny-mlp"]
    inputs = inputs_for(d)
    async with Engine(plan_files=False) as engine:
        inst = engine.instance("m", str(d))
        for _ in range(2):
            await inst.infer(inputs)
            assert "skeleton" in stages(inst)
            await inst.unload()
        assert inst._ready.builds == 0 and not inst._ready.ready


async def test_changed_model_rebuilds(model_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dirs["tiny-gpt2"], d, ignore=shutil.ignore_patterns(PLAN_DIR))
    inputs = inputs_for(d)
    async with Engine(plan_files=False) as engine:
        inst = engine.instance("m", str(d))
        await inst.prebuild()
        await inst.infer(inputs)
        assert "skeleton" not in stages(inst)
        await inst.unload()
        await idle(engine)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-2}))
        changed = await inst.infer(inputs)
        assert "skeleton" in stages(inst), "a skeleton built from the old config was used"
        assert inst._model.transformer.ln_f.eps == 1e-2
        await inst.unload()
        await idle(engine)
        assert inst._ready.builds == 2 and inst._ready.ready  # rebuilt once, from the new config
        again = await inst.infer(inputs)
        assert "skeleton" not in stages(inst) and inst._model.transformer.ln_f.eps == 1e-2
    assert_equal_outputs(reference(d, inputs), changed)
    assert_equal_outputs(changed, again)


async def test_dtype_is_part_of_the_skeleton_key(model_dirs):
    from cicada_async.engine.runtime import ModelOptions

    d = model_dirs["tiny-gpt2"]
    inputs = inputs_for(d)
    async with Engine(plan_files=False) as engine:
        inst = engine.instance("m", str(d), ModelOptions(dtype="bfloat16"))
        await inst.prebuild()
        assert next(inst._ready._spare.parameters()).dtype == torch.bfloat16
        out = await inst.infer(inputs)
        assert "skeleton" not in stages(inst)
    assert_equal_outputs(reference(d, inputs, torch.bfloat16), out)


async def test_failed_prebuild_falls_back_to_building_at_load(model_dirs, tmp_path, caplog):
    d = tmp_path / "m"
    d.mkdir()
    async with Engine(plan_files=False) as engine:
        inst = engine.instance("m", str(d), describe=False)
        await inst.prebuild_quietly()  # no config yet: logs, raises nothing
        assert not inst._ready.ready
        assert any("could not build the skeleton" in r.getMessage() for r in caplog.records)
        for f in Path(model_dirs["tiny-mlp"]).iterdir():
            if f.is_file():
                shutil.copy(f, d / f.name)
        inputs = inputs_for(d)
        out = await inst.infer(inputs)
        assert "skeleton" in stages(inst)
    assert_equal_outputs(reference(d, inputs), out)
