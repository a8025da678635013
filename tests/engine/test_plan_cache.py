"""Plan files: a cold start whose order is known runs no dry forward; a stale, corrupt, wrong or
unwritable plan file costs at most a re-plan, never a wrong answer."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest

from cicada_async.cli import main as cli_main
from cicada_async.engine.plancache import PLAN_DIR, decode
from cicada_async.engine.runtime import Engine

from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference


@pytest.fixture(autouse=True)
def own_plan_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan dir of this test's own: the session's ($XDG_CACHE_HOME, shared by every test)
    holds the plans other tests' remote models stored, and a lookup of the same bytes finds
    them (CI at ea99280: a served tiny-gpt2's plan made ten of these tests see no first dry
    forward)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def private_copy(model_dirs: dict[str, Path], name: str, tmp_path: Path) -> Path:
    """A model directory of this test's own: the session's fixtures gather plan files."""
    dst = tmp_path / name
    shutil.copytree(model_dirs[name], dst, ignore=shutil.ignore_patterns(PLAN_DIR))
    return dst


def stages(inst) -> set[str]:  # type: ignore[no-untyped-def]
    return {s.name for s in inst.last_timeline.spans if s.kind == "stage"}


async def cold_infer(uri: str, inputs, **engine_kwargs):  # type: ignore[no-untyped-def]
    """One cold start in a fresh engine: nothing is known in memory, only what is on disk."""
    async with Engine(**engine_kwargs) as engine:
        inst = engine.instance("m", uri)
        out = await inst.infer(inputs)
        return out, stages(inst), inst._plan


def plan_files(where: Path) -> list[Path]:
    return sorted(where.glob("plan-*.json"))


async def test_known_plan_skips_the_dry_forward(model_dirs, tmp_path):
    d = private_copy(model_dirs, "tiny-gpt2", tmp_path)
    inputs = inputs_for(d)
    first, st1, plan1 = await cold_infer(str(d), inputs)
    assert "dry-run" in st1, "no plan file existed: the first cold start must run the dry forward"
    [path] = plan_files(d / PLAN_DIR)
    doc = json.loads(path.read_bytes())
    assert doc["modules"] == list(plan1.modules) and doc["order_source"] == "dry-forward"
    assert path.name == f"plan-{doc['key']}.json"

    second, st2, plan2 = await cold_infer(str(d), inputs)
    assert "dry-run" not in st2 and "plan" in st2
    assert plan2.modules == plan1.modules and plan2.order_source == "dry-forward"
    assert plan2.uncalled == plan1.uncalled
    assert_equal_outputs(reference(d, inputs), first)
    assert_equal_outputs(first, second)
    assert plan_files(d / PLAN_DIR) == [path]  # a hit writes nothing new


def _corrupt(path: Path) -> None:
    path.write_bytes(b'{"format": 1, "key": ')


def _schema(path: Path) -> None:
    doc = json.loads(path.read_bytes())
    path.write_text(json.dumps({**doc, "modules": "transformer.h.0"}))


def _stale(path: Path) -> None:
    doc = json.loads(path.read_bytes())
    path.write_text(json.dumps({**doc, "key": "0" * 32}))


def _unknown_module(path: Path) -> None:
    # Valid JSON, right key, but an order that names a module the skeleton does not plan.
    doc = json.loads(path.read_bytes())
    path.write_text(json.dumps({**doc, "modules": doc["modules"][:-1] + ["transformer.h.99"]}))


def _missing_module(path: Path) -> None:
    doc = json.loads(path.read_bytes())
    path.write_text(json.dumps({**doc, "modules": doc["modules"][1:], "uncalled": []}))


@pytest.mark.parametrize("damage", [_corrupt, _schema, _stale, _unknown_module, _missing_module],
                         ids=lambda f: f.__name__.strip("_"))
async def test_bad_plan_file_replans_once_logged(model_dirs, tmp_path, damage, caplog):
    d = private_copy(model_dirs, "tiny-gpt2", tmp_path)
    inputs = inputs_for(d)
    good, _, plan = await cold_infer(str(d), inputs)
    [path] = plan_files(d / PLAN_DIR)
    key = json.loads(path.read_bytes())["key"]
    damage(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cicada_async.engine.plancache"):
        out, st, used = await cold_infer(str(d), inputs)
    assert "dry-run" in st, "a bad plan file was used instead of planning again"
    assert used.modules == plan.modules
    assert_equal_outputs(good, out)
    lines = [r for r in caplog.records if r.name == "cicada_async.engine.plancache"]
    assert len(lines) == 1 and "planning again" in lines[0].getMessage(), [r.getMessage() for r in lines]
    # The re-plan replaced the bad file with a good one: the next cold start skips the dry run.
    assert decode(path.read_bytes(), key).modules == plan.modules
    assert "dry-run" not in (await cold_infer(str(d), inputs))[1]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-resnet", "tiny-gpt2-sharded"])
async def test_wrong_but_valid_order_still_gives_equal_outputs(model_dirs, tmp_path, name):
    """Every module named, in reverse, and nothing declared uncalled: the gates still wait for
    each module's own shards, so only the fetch order suffers."""
    d = private_copy(model_dirs, name, tmp_path)
    inputs = inputs_for(d)
    await cold_infer(str(d), inputs)
    [path] = plan_files(d / PLAN_DIR)
    doc = json.loads(path.read_bytes())
    wrong = doc["modules"][::-1]
    path.write_text(json.dumps({**doc, "modules": wrong, "uncalled": []}))
    out, st, used = await cold_infer(str(d), inputs)
    assert "dry-run" not in st and list(used.modules) == wrong, "the cached order was not used"
    assert_equal_outputs(reference(d, inputs), out)


async def test_changed_config_is_another_key(model_dirs, tmp_path):
    d = private_copy(model_dirs, "tiny-gpt2", tmp_path)
    inputs = inputs_for(d)
    await cold_infer(str(d), inputs)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-3}))
    out, st, _ = await cold_infer(str(d), inputs)
    assert "dry-run" in st, "a plan made for another config was reused"
    assert len(plan_files(d / PLAN_DIR)) == 2
    assert_equal_outputs(reference(d, inputs), out)


async def test_dtype_is_part_of_the_key(model_dirs, tmp_path):
    from cicada_async.engine.runtime import ModelOptions

    d = private_copy(model_dirs, "tiny-gpt2", tmp_path)
    inputs = inputs_for(d)
    await cold_infer(str(d), inputs)
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(dtype="bfloat16"))
        await inst.infer(inputs)
        assert "dry-run" in stages(inst)
    assert len(plan_files(d / PLAN_DIR)) == 2


async def test_remote_model_keeps_its_plan_in_plan_dir(model_dirs, tmp_path):
    d = private_copy(model_dirs, "tiny-bert", tmp_path)
    inputs = inputs_for(d)
    plans = tmp_path / "plans"
    first, st1, _ = await cold_infer(f"memory://{d}", inputs, plan_dir=plans)
    assert "dry-run" in st1 and len(plan_files(plans)) == 1
    assert not (d / PLAN_DIR).exists(), "a remote model's plan was written beside its source"
    second, st2, _ = await cold_infer(f"memory://{d}", inputs, plan_dir=plans)
    assert "dry-run" not in st2
    assert_equal_outputs(first, second)
    # Without plan files the engine plans every time.
    assert "dry-run" in (await cold_infer(f"memory://{d}", inputs, plan_dir=plans, plan_files=False))[1]


async def test_unwritable_cache_falls_back_to_planning(model_dirs, tmp_path, caplog):
    d = private_copy(model_dirs, "tiny-convnet", tmp_path)
    inputs = inputs_for(d)
    (d / PLAN_DIR).write_text("a file where the plan directory would be")
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="cicada_async.engine.plancache"):
        for _ in range(2):
            out, st, _ = await cold_infer(str(d), inputs, plan_dir=blocked / "plans")
            assert "dry-run" in st
            assert_equal_outputs(reference(d, inputs), out)
    writes = [r for r in caplog.records if "could not write" in r.getMessage()]
    assert len(writes) == 2, [r.getMessage() for r in caplog.records]  # one line per cold start


async def test_read_only_model_dir_falls_back_to_plan_dir(model_dirs, tmp_path):
    d = private_copy(model_dirs, "tiny-mlp", tmp_path)
    inputs = inputs_for(d)
    (d / PLAN_DIR).write_text("blocks the directory")
    plans = tmp_path / "plans"
    await cold_infer(str(d), inputs, plan_dir=plans)
    assert len(plan_files(plans)) == 1
    assert "dry-run" not in (await cold_infer(str(d), inputs, plan_dir=plans))[1]


@pytest.mark.parametrize("name", ["tiny-gpt2-sharded"])
async def test_pack_writes_the_plan_into_the_packed_layout(model_dirs, tmp_path, name):
    src = private_copy(model_dirs, name, tmp_path)
    inputs = inputs_for(src)
    await cold_infer(str(src), inputs)  # src now has a plan of its own layout
    dst = tmp_path / "packed"
    assert await asyncio.to_thread(cli_main, ["pack", str(src), str(dst)]) == 0  # it runs a loop
    [path] = plan_files(dst / PLAN_DIR)
    assert path.name not in {p.name for p in plan_files(src / PLAN_DIR)}, \
        "the packed layout (shards refilled in execution order) must have its own key"
    manifest = json.loads((dst / "cicada.manifest.json").read_text())
    assert not any(k.startswith(PLAN_DIR) for k in manifest["files"])
    for uri in (str(dst), f"memory://{dst}"):  # local, and as if uploaded to remote storage
        out, st, _ = await cold_infer(uri, inputs, plan_dir=tmp_path / "empty")
        assert "dry-run" not in st, uri
        assert_equal_outputs(reference(src, inputs), out)
    assert not (tmp_path / "empty").exists()


async def test_known_plan_orders_the_first_reads(model_dirs, tmp_path):
    """Reads issued before the skeleton exists follow the stored order: gpt2's embedding (last
    in its file, needed by the first layer) is read first, not after every other layer."""
    from cicada_async.engine.headers import all_tensors
    from cicada_async.engine.plan import first_reads
    from cicada_async.engine.pipeline import read_headers
    from cicada_async.engine.modeldir import read_model_spec
    from backends.local import LocalBackend

    d = private_copy(model_dirs, "tiny-gpt2", tmp_path)
    inputs = inputs_for(d)
    _, _, plan = await cold_infer(str(d), inputs, read_bytes=4096)
    backend = LocalBackend(d)
    hdrs = await read_headers(backend, await read_model_spec(backend))
    await backend.aclose()
    tensors = all_tensors(hdrs)
    wte = tensors["transformer.wte.weight"]
    assert wte.start == max(e.start for e in tensors.values()), "fixture: the embedding is last in its file"
    before = first_reads(hdrs, None, read_bytes=16384, alignment=1)
    hinted = first_reads(hdrs, plan.modules, read_bytes=16384, alignment=1)
    assert before[0].start < wte.start <= hinted[0].start < wte.end
    # Every tensor byte is read, in either order.
    for reads in (before, hinted):
        for name, e in tensors.items():
            spans = sorted((r.start, r.end) for r in reads if r.file == e.file and r.start < e.end and r.end > e.start)
            assert spans[0][0] <= e.start and spans[-1][1] >= e.end
            assert all(a[1] >= b[0] for a, b in zip(spans, spans[1:])), f"a hole in {name}"
    # Names no planned module owns (legacy checkpoint names) are read after the planned ones.
    odd = first_reads(hdrs, [m for m in plan.modules if m != "transformer.wte"], read_bytes=16384, alignment=1)
    assert odd[-1].end > wte.start and odd[0].start != hinted[0].start

    # In a cold start: the second one (the plan file is known) issues the embedding's read first.
    _, st, used = await cold_infer(str(d), inputs, read_bytes=4096)
    assert "dry-run" not in st
    first = used.reads[0]
    assert first.file == wte.file and wte.start <= first.start + 4096 and first.start < wte.end
    assert plan.reads[0].start < wte.start, "without a plan file the first read is the file's start"
