"""Every tensor of a loaded model ends on the target device, buffers made in __init__ included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backends.local import LocalBackend
from cicada_async.bench.strategies import local_spec
from cicada_async.engine.headers import read_header
from cicada_async.engine.pipeline import all_tensors
from cicada_async.engine.skeleton import build_skeleton, index_skeleton, place_buffers
from tests.fixtures.helpers import inputs_for
from tests.fixtures.models import FAMILIES

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama", "tiny-resnet"])
async def test_unbacked_buffers_go_to_a_stand_in_device(model_dirs: dict[str, Path], name: str) -> None:
    """On the CPU, ``meta`` stands in for the target device: what the checkpoint does not fill
    must move there (on CUDA, BERT's position_ids stayed on the CPU)."""
    d = model_dirs[name]
    spec = local_spec(d)
    backend = LocalBackend(d)
    try:
        hdrs = {k: await read_header(backend, k) for k in spec.weight_files}
    finally:
        await backend.aclose()
    model = build_skeleton(spec, None)
    index = index_skeleton(model, all_tensors(hdrs), spec.checkpoint_renamer(model))
    backed = {(id(m), a) for s in index.slots.values() for m, a in s.owners}
    unbacked = [(mod, n) for mod in model.modules() for n, b in mod._buffers.items()
                if b is not None and (id(mod), n) not in backed]
    moved = place_buffers(model, index, torch.device("meta"))
    assert moved >= (1 if name != "tiny-resnet" else 0)
    for mod, n in unbacked:
        assert mod._buffers[n].is_meta, f"{n} stayed on {mod._buffers[n].device}"
    for mod in model.modules():
        for n, b in mod._buffers.items():
            if b is not None and (id(mod), n) in backed:
                assert not b.is_meta, f"checkpoint-backed {n} must wait for its bytes"


@pytest.mark.parametrize("name", FAMILIES)
async def test_loaded_model_has_every_tensor_on_the_target(model_dirs: dict[str, Path], name: str) -> None:
    from cicada_async.engine.runtime import Engine, ModelOptions

    d = model_dirs[name]
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions())
        await inst.infer(inputs_for(d))
        model = inst._model
        assert model is not None
        wrong = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cpu"]
        assert not wrong, f"not on the target device: {wrong[:5]}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
async def test_cuda_load_has_every_tensor_on_the_gpu(model_dirs: dict[str, Path], name: str) -> None:
    from cicada_async.engine.runtime import Engine, ModelOptions

    d = model_dirs[name]
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(device="cuda"))
        await inst.infer(inputs_for(d))
        model = inst._model
        assert model is not None
        wrong = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cuda"]
        assert not wrong, f"not on the GPU: {wrong[:5]}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_cuda_concurrent_cold_starts_on_their_own_streams_are_exact(model_dirs: dict[str, Path]) -> None:
    """Two loads compute at once on their own streams, a warm model in between; all exact."""
    import asyncio

    from cicada_async.engine.runtime import Engine, ModelOptions
    from tests.engine.test_exactness import reference_on
    from tests.fixtures.helpers import assert_equal_outputs

    names = ["tiny-bert", "tiny-llama", "tiny-gpt2"]
    async with Engine(storage={"memory": {"delay_s": 0.01}}, read_bytes=16 << 10) as engine:
        warm = engine.instance("warm", str(model_dirs["tiny-mlp"]), ModelOptions(device="cuda"))
        await warm.infer(inputs_for(model_dirs["tiny-mlp"]))
        insts = [engine.instance(n, f"memory://{model_dirs[n]}", ModelOptions(device="cuda")) for n in names]
        outs = await asyncio.gather(*(i.infer(inputs_for(model_dirs[n])) for i, n in zip(insts, names)),
                                    *(warm.infer(inputs_for(model_dirs["tiny-mlp"])) for _ in range(5)))
    for n, out in zip(names, outs):
        assert_equal_outputs(reference_on(model_dirs[n], inputs_for(model_dirs[n]), "cuda"), out)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_skeleton_buffers_are_real_under_another_default_device(model_dirs: dict[str, Path], name: str) -> None:
    """The CPU device context is entered only when the default device is not the CPU: under a
    ``meta`` default, ``__init__``'s buffers (position ids, rotary frequencies) are still real."""
    spec = local_spec(model_dirs[name])
    baseline = build_skeleton(spec, None)
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        model = build_skeleton(spec, None)
    finally:
        torch.set_default_device(before)
    bufs = dict(model.named_buffers())
    assert bufs and all(b.device.type == "cpu" for b in bufs.values()), {k: b.device for k, b in bufs.items()}
    for k, b in dict(baseline.named_buffers()).items():
        assert torch.equal(bufs[k], b), k
    assert all(p.is_meta for p in model.parameters())


def test_pinned_staging_pool_is_sized_at_the_allocators_block_size() -> None:
    """torch's pinned host allocator rounds blocks up to a power of two: a pool of 10.3 MiB
    slabs counted at their own size pinned 24 x 16 MiB = 384 MiB for a 256 MiB budget."""
    from cicada_async.engine.slabs import slab_pool

    slab, count = slab_pool(10_760_000, 256 << 20, pinned=True)
    assert (slab, count) == (16 << 20, 16) and slab * count <= 256 << 20
    assert slab_pool(16 << 20, 256 << 20, pinned=True) == (16 << 20, 16)  # already a power of two
    assert slab_pool(10_760_000, 256 << 20, pinned=False) == (10_760_000, 24)  # pageable: as asked
    assert slab_pool(100 << 20, 64 << 20, pinned=True)[1] == 2  # never fewer than two
