"""A model's charge is the bytes it serves, in the serving dtype, not the checkpoint's bytes.

The oracle is the checkpoint itself: its tensors' element counts (read with the safetensors
library) times the serving dtype's element size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cicada_async.engine.runtime import Engine, ModelOptions
from tests.fixtures.helpers import inputs_for

pytestmark = pytest.mark.timeout(120)


def _elements(d: Path) -> tuple[int, int]:
    """(float elements, other bytes) over every tensor of every weight file in ``d``."""
    floats = other = 0
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = sf.get_tensor(k)
                if t.is_floating_point():
                    floats += t.numel()
                else:
                    other += t.numel() * t.element_size()
    return floats, other


def _as_bf16(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}  # noqa: SIM118
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
                  str(f), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(("ckpt", "serve", "itemsize"), [("fp32", "bfloat16", 2), ("bf16", "float32", 4)])
async def test_nbytes_are_the_served_bytes(model_dirs: dict[str, Path], tmp_path: Path,
                                           ckpt: str, serve: str, itemsize: int) -> None:
    d = model_dirs["tiny-gpt2"]
    if ckpt == "bf16":
        d = _as_bf16(d, tmp_path / "bf16")
    floats, other = _elements(d)
    served = floats * itemsize + other
    on_disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert abs(served - on_disk) > on_disk // 3  # the dtype really changes the size
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(dtype=serve))
        await inst.describe()
        before = inst.weight_bytes
        await inst.infer(inputs_for(d))
        # Narrow: the skeleton may hold a few non-persistent buffers the files do not.
        assert before is not None and served <= before <= served * 1.02, (before, served)
        assert inst.nbytes is not None and served <= inst.nbytes <= served * 1.02, (inst.nbytes, served)
        assert inst.device_bytes == {"cpu": inst.nbytes}
