"""Pipelined loads give exactly the outputs of the plain PyTorch load, for every family."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from backends.local import LocalBackend
from cicada_async.engine.executor import Executor
from cicada_async.engine.fetch import FetchScheduler
from cicada_async.engine.pipeline import LoadRequest, cold_start
from cicada_async.engine.runtime import Engine
from tests.fixtures.helpers import (
    assert_equal_outputs,
    cicada_infer,
    inputs_for,
    reference,
)
from tests.fixtures.models import FAMILIES

ROOT = Path(__file__).resolve().parents[2]


def _pixels_in(inputs: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A vision model served in bf16 takes bf16 pixels (token ids stay integers)."""
    if dtype is None:
        return inputs
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("name", FAMILIES)
async def test_cicada_equals_eager(model_dirs, name):
    d = model_dirs[name]
    inputs = inputs_for(d)
    ref = reference(d, inputs)
    out = await cicada_infer(d, inputs)
    assert_equal_outputs(ref, out)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert", "tiny-resnet", "tiny-llama", "tiny-gpt2-sharded"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
async def test_arena_path_equals_eager(model_dirs, name, dtype):
    """Local files read with O_DIRECT into anonymous arenas (mapped=False) give the same."""
    from cicada_async.engine.job import LoadOptions

    d = model_dirs[name]
    inputs = _pixels_in(inputs_for(d), dtype)
    ref = reference(d, inputs, dtype=dtype)
    ex = Executor()
    ex.start()
    backend = LocalBackend(d)
    try:
        _, out, _ = await cold_start(backend, ex, FetchScheduler(2), LoadRequest(
            inputs=inputs, options=LoadOptions(mapped=False, read_bytes=16384, dtype=dtype)))
    finally:
        await backend.aclose()
        ex.stop()
    assert_equal_outputs(ref, out)


def test_hf_from_pretrained_agrees(model_dirs):
    """Our eager reference itself matches transformers' own loader (checks key renames)."""
    import transformers

    d = model_dirs["tiny-vit"]
    inputs = inputs_for(d)
    model = transformers.ViTModel.from_pretrained(str(d)).eval()
    with torch.inference_mode():
        hf_out = model(**inputs).last_hidden_state
    assert torch.equal(hf_out, reference(d, inputs)["last_hidden_state"])


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-resnet"])
async def test_any_landing_order(model_dirs, name, order):
    d = model_dirs[name]
    inputs = inputs_for(d)
    ref = reference(d, inputs)
    rng = random.Random(7)

    def permute(shards: list[int]) -> list[int]:
        if order == "reversed":
            return sorted(shards, reverse=True)
        rng.shuffle(shards)
        return shards

    ex = Executor()
    ex.start()
    backend = LocalBackend(d)
    try:
        # Small reads so there are many of them, landing in the permuted order.
        from cicada_async.engine.job import LoadOptions

        model, out, job = await cold_start(backend, ex, FetchScheduler(2), LoadRequest(
            inputs=inputs, shard_order=permute, options=LoadOptions(read_bytes=4096)))
        applied = [s.name for s in job.timeline.spans if s.kind == "apply"]
        assert len(applied) == len(job.plan.shards)
    finally:
        await backend.aclose()
        ex.stop()
    assert_equal_outputs(ref, out)


async def test_warm_forward_matches_and_gates_removed(model_dirs):
    d = model_dirs["tiny-gpt2"]
    inputs = inputs_for(d)
    ref = reference(d, inputs)
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        cold = await inst.infer(inputs)
        assert inst.state == "ready"
        warm = await inst.infer(inputs)
        model = inst._model
        assert model is not None
        # No gate and no timing hook is left; only the layer boundaries where forwards yield.
        assert not any(m._forward_hooks for m in model.modules())
        pre = [h for m in model.modules() for h in m._forward_pre_hooks.values()]
        assert pre and {h.__name__ for h in pre} == {"yield_point"}
    assert_equal_outputs(ref, cold)
    assert_equal_outputs(ref, warm)


async def test_tied_weights_stay_one_tensor(model_dirs):
    async with Engine() as engine:
        inst = engine.instance("m", str(model_dirs["tiny-llama"]))
        await inst.load()
        m = inst._model
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert not m.lm_head.weight.is_meta
        inst2 = engine.instance("u", str(model_dirs["tiny-llama-untied"]))
        await inst2.load()
        m2 = inst2._model
        assert m2.lm_head.weight is not m2.model.embed_tokens.weight


async def test_nonpersistent_buffers_kept(model_dirs):
    """Rotary inv_freq is not in the checkpoint; the skeleton keeps __init__'s values."""
    async with Engine() as engine:
        inst = engine.instance("m", str(model_dirs["tiny-llama"]))
        await inst.load()
        inv = inst._model.model.rotary_emb.inv_freq
        assert not inv.is_meta and torch.isfinite(inv).all() and inv.abs().sum() > 0


async def test_dtype_conversion_matches_eager_then_cast(model_dirs):
    d = model_dirs["tiny-gpt2"]
    inputs = inputs_for(d)
    ref = reference(d, inputs, dtype=torch.bfloat16)
    out = await cicada_infer(d, inputs, dtype="bfloat16")
    assert out["logits"].dtype == torch.bfloat16
    assert_equal_outputs(ref, out)


async def test_params_are_views_without_copy(model_dirs):
    """fp32 checkpoint served as fp32 on CPU: parameters view the landed bytes."""
    ex = Executor()
    ex.start()
    backend = LocalBackend(model_dirs["tiny-bert"])
    try:
        model, _, job = await cold_start(backend, ex, FetchScheduler(2))
        views = job.landing.views  # the mapped files
        (base,) = [v.data_ptr() for v in views.values()]
        size = next(iter(views.values())).numel()
        for name, p in model.named_parameters():
            # A view into the mapping itself, not a copy of it anywhere else.
            assert base <= p.data_ptr() < base + size, f"{name} was copied"
    finally:
        await backend.aclose()
        ex.stop()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-resnet", "tiny-llama-untied"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
async def test_staging_path_equals_eager(model_dirs, name, dtype):
    """The CUDA path's staging (reused slabs, assembly on the target) run on the CPU."""
    from cicada_async.engine.fetch import FetchSettings
    from cicada_async.engine.job import LoadOptions

    d = model_dirs[name]
    torch_dtype = getattr(torch, dtype) if dtype else None
    inputs = _pixels_in(inputs_for(d), torch_dtype)
    ref = reference(d, inputs, dtype=torch_dtype)
    ex = Executor()
    ex.start()
    backend = LocalBackend(d)
    try:
        # A pool of a few small slabs: slabs must be recycled for the load to finish.
        _, out, job = await cold_start(backend, ex, FetchScheduler(2), LoadRequest(
            inputs=inputs, options=LoadOptions(read_bytes=8192, staging=True, dtype=torch_dtype),
            fetch=FetchSettings(queue_bytes=64 << 10)))
    finally:
        await backend.aclose()
        ex.stop()
    assert_equal_outputs(ref, out)
    # The staging slabs went back after the load; only the device buffers the tensors view stay.
    assert job.landing._free.qsize() == 0 and not job.landing.slabs


async def test_converting_staging_load_keeps_no_raw_device_bytes(model_dirs):
    """Serving fp32 weights as bf16 through the staging path (the CUDA path, here on the CPU):
    once loaded, the file-shaped device buffers the bytes landed in are gone, and no tensor the
    model keeps (BatchNorm's int64 ``num_batches_tracked`` included, which is not converted)
    is a view that would keep a whole raw file alive on the device beside its converted copy."""
    from cicada_async.engine.fetch import FetchSettings
    from cicada_async.engine.job import LoadOptions

    d = model_dirs["tiny-resnet"]
    inputs = _pixels_in(inputs_for(d), torch.bfloat16)
    ex = Executor()
    ex.start()
    backend = LocalBackend(d)
    try:
        model, out, job = await cold_start(backend, ex, FetchScheduler(2), LoadRequest(
            inputs=inputs, options=LoadOptions(read_bytes=8192, staging=True, dtype=torch.bfloat16),
            fetch=FetchSettings(queue_bytes=64 << 10)))
    finally:
        await backend.aclose()
        ex.stop()
    assert_equal_outputs(reference(d, inputs, dtype=torch.bfloat16), out)
    assert job.landing.device_files == {}
    kept = [*model.parameters(), *model.buffers()]
    assert any(t.dtype == torch.int64 for t in kept)  # the case that used to view the raw file
    for t in kept:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), t.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-resnet", "tiny-bert"])
async def test_cuda_equals_eager_on_cuda(model_dirs, name):
    d = model_dirs[name]
    inputs = inputs_for(d)
    ref = reference_on(d, inputs, "cuda")
    out = await cicada_infer(d, inputs, device="cuda")
    assert_equal_outputs(ref, out)


def reference_on(d, inputs, device):  # type: ignore[no-untyped-def]
    from cicada_async.bench.strategies import _state_dict, local_spec
    from cicada_async.engine.forward import output_dict

    spec = local_spec(d)
    model = spec.build()
    model.load_state_dict(_state_dict(d, spec, model), strict=False)
    model.to(device)
    with torch.inference_mode():
        out = output_dict(model(**{k: v.to(device) for k, v in inputs.items()}))
    return {k: v.cpu() for k, v in out.items()}


# Issue 24, item 4: cold == warm == plain load, bit for bit, with the thread counts `cicada
# serve` picks, in processes without the test suite's MKL_CBWR (a server does not set it; and
# MKL's strict mode is reproducible only for one thread count: measured, it made tiny-bert,
# -vit, -gpt2 depend on the count where torch's default kernels did not). The reference is the
# plain load in its own process, on torch's default threads (every core).
_REFERENCE = """
import sys, torch
from pathlib import Path
from tests.fixtures.helpers import inputs_for, reference
out = {}
for d in sys.argv[2:]:
    out[d] = reference(Path(d), inputs_for(Path(d)))
torch.save(out, sys.argv[1])
"""
_SERVED = """
import asyncio, sys, torch
from pathlib import Path
from cicada_async.engine.job import ModelOptions
from cicada_async.engine.procfs import threads_while_fetching
from cicada_async.engine.runtime import Engine
from tests.fixtures.helpers import inputs_for
torch.set_num_threads(threads_while_fetching())  # what `cicada serve` sets at start (server.py)

async def main():
    out = {}
    # Slow reads (memory://, 16 KiB one at a time, 0.1 s each): the cold forward's layers run
    # while the later ones still fetch, as on a real cold start (tiny-resnet's third stage,
    # whose convolution is the first to tell 1 thread from 2, lands 0.3 s before the last).
    async with Engine(every_core_when_idle=True, storage={"memory": {"delay_s": 0.1}},
                      read_bytes=4 << 10, read_concurrency=1) as engine:
        for i, d in enumerate(sys.argv[2:]):
            inst = engine.instance(f"m{i}", f"memory://{d}", ModelOptions())
            x = inputs_for(Path(d))
            out[d] = {"cold": await inst.infer(dict(x)), "warm": await inst.infer(dict(x))}
    torch.save(out, sys.argv[1])

asyncio.run(main())
"""


def _without_cbwr(script: str, dst: Path, dirs: list[Path]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    subprocess.run([sys.executable, "-c", script, str(dst), *map(str, dirs)], cwd=ROOT, env=env,
                   check=True, timeout=300)
    out: dict[str, Any] = torch.load(dst)
    return out


@pytest.mark.timeout(600)
def test_cold_warm_and_plain_load_bit_identical_at_the_servers_thread_counts(model_dirs, tmp_path):
    from cicada_async.models.catalogue import make_model

    dirs = [model_dirs[n] for n in ("tiny-gpt2", "tiny-bert", "tiny-vit", "tiny-resnet", "tiny-llama")]
    dirs.append(make_model("tiny-roberta", tmp_path / "tiny-roberta", seed=1))
    want = _without_cbwr(_REFERENCE, tmp_path / "reference.pt", dirs)
    got = _without_cbwr(_SERVED, tmp_path / "served.pt", dirs)
    for d in dirs:
        for kind in ("cold", "warm"):
            out, ref = got[str(d)][kind], want[str(d)]
            assert out.keys() == ref.keys(), (d.name, kind)
            for k in ref:
                assert torch.equal(out[k], ref[k]), (d.name, kind, k, (out[k] - ref[k]).abs().max().item())
