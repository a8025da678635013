"""Serving a checkpoint in another dtype gives what transformers' from_pretrained(dtype=...) gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.fixtures.helpers import assert_equal_outputs, cicada_infer, inputs_for

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
async def test_bf16_equals_from_pretrained(model_dirs: dict[str, Path], name: str) -> None:
    import transformers

    d = model_dirs[name]
    inputs = inputs_for(d)
    arch = json.loads((d / "config.json").read_text())["architectures"][0]
    ref_model = getattr(transformers, arch).from_pretrained(str(d), dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = ref_model(**inputs)
    out = await cicada_infer(d, inputs, dtype="bfloat16")
    want = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor) and k in out}
    assert want, "no common outputs to compare"
    assert_equal_outputs(want, {k: out[k] for k in want})


class KeepsNormInFp32(nn.Module):
    """Declares, as transformers models do, a module that must stay fp32; and holds an int and
    an F8 tensor that no serving dtype may convert, and a non-persistent fp32 buffer."""

    _keep_in_fp32_modules_strict = ["norm"]

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("steps", torch.arange(dim, dtype=torch.int64))
        self.register_buffer("scale_f8", torch.full((dim,), 0.5).to(torch.float8_e4m3fn))
        self.register_buffer("freq", torch.linspace(0, 1, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = self.norm(h.float()).to(h.dtype)
        return h * self.scale_f8.to(h.dtype) + self.steps.to(h.dtype) + self.freq.to(h.dtype)


async def test_keep_in_fp32_integers_and_f8_are_not_converted(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    from cicada_async.engine.runtime import Engine, ModelOptions

    torch.manual_seed(0)
    d = tmp_path / "keeps"
    d.mkdir()
    save_model(KeepsNormInFp32().eval(), str(d / "model.safetensors"))
    (d / "cicada.json").write_text(json.dumps({
        "factory": f"{__name__}:KeepsNormInFp32", "kwargs": {"dim": 8},
        "inputs": {"x": {"shape": [-1, 8], "dtype": "bfloat16"}},
    }))
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(dtype="bfloat16"))
        await inst.infer({"x": torch.ones(2, 8, dtype=torch.bfloat16)})
        model = inst._model
        assert model is not None
        assert model.proj.weight.dtype == torch.bfloat16
        assert model.norm.weight.dtype == torch.float32 and model.norm.bias.dtype == torch.float32
        assert model.steps.dtype == torch.int64
        assert model.scale_f8.dtype == torch.float8_e4m3fn
        assert model.freq.dtype == torch.float32  # non-persistent: the dtype __init__ gave it
