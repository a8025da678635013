"""Reference loads the plain PyTorch way, and checks shared by tests."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import torch

from cicada_async.engine import Engine, ModelOptions
from cicada_async.strategies import eager, example_inputs, local_spec


def reference(model_dir: Path, inputs: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Outputs of the same weights loaded the plain way: init, load_file, load_state_dict."""
    spec = local_spec(model_dir)
    # A different seed than the one that wrote the weights, so a load that forgot a tensor
    # cannot pass by re-creating the same random init.
    torch.manual_seed(12345)
    out, _ = eager(model_dir, spec, inputs, dtype)
    return out


def inputs_for(model_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    return example_inputs(local_spec(model_dir), batch=2, seq=16, seed=seed)


async def cicada_infer(model_dir: Path, inputs: dict[str, torch.Tensor], **options: object) -> dict[str, torch.Tensor]:
    async with Engine() as engine:
        inst = engine.instance("m", str(model_dir), ModelOptions(**options))  # type: ignore[arg-type]
        return await inst.infer(inputs)


def assert_equal_outputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"output {k} differs"


def extra_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()
            and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)
