"""The forward on the executor thread, and naming what a forward returns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from protocols.errors import CicadaError, InferenceError


def run_forward(model: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A forward on the executor thread; outputs named and on the CPU."""
    try:
        with torch.inference_mode():
            if device.type != "cpu":
                inputs = {k: v.to(device) for k, v in inputs.items()}
            out = output_dict(model(**inputs))
            if device.type != "cpu":
                out = {k: v.cpu() for k, v in out.items()}
            return out
    except CicadaError:
        raise
    except Exception as e:  # noqa: BLE001 - any forward failure is the model's, not ours
        raise InferenceError(f"forward failed: {type(e).__name__}: {e}") from e


def output_dict(out: Any) -> dict[str, torch.Tensor]:
    """Name a forward's result: a ModelOutput's tensor fields, or ``output`` / ``output_N``."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise TypeError(f"cannot name the outputs of a forward returning {type(out).__name__}")
