"""The forward on the executor thread, and naming what a forward returns."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cicada_async.engine.procfs import usable_cores
from protocols.errors import CicadaError, InferenceError
from protocols.serving import TensorSpec

if TYPE_CHECKING:
    from cicada_async.engine.modeldir import ModelSpec

V2_TYPES = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16",
            torch.int64: "INT64", torch.int32: "INT32", torch.bool: "BOOL", torch.uint8: "UINT8"}


class Widening:
    """Torch intra-op threads of one forward: every usable core for the whole forward (``wide``),
    then back to the entering thread's setting.

    The count is set once, when the forward starts, and never changed inside it: a reduction
    (a matmul's, a convolution's) is split by the thread count, so a forward that changed it at
    a layer gate, as the cold start's once did on seeing the fetch end, computed its first
    layers on cores - 1 threads and its answer differed from a warm one's (RoBERTa by 1e-7).
    Every forward of the engine runs on the same count (``procfs.forward_threads``), and the
    plain PyTorch load computes on every core too: cold == warm == plain load, bit for bit.

    Set and restored by the entering thread only, never from another thread's layer gate (a
    joined forward passing a gated forward's gate once widened for good). Note that
    ``torch.set_num_threads`` acts on the whole process here (measured: a count set on one
    thread is what the others and fresh threads then read), so the server sets the count once
    at start (``forward_threads``) and a Widening has nothing left to change there; it matters
    for an engine whose process setting is lower (tools, tests).
    """

    def __init__(self, wide: bool) -> None:
        self._wide = wide
        self._before: int | None = None
        self._thread: int | None = None

    def __enter__(self) -> "Widening":
        cores = usable_cores()
        if self._wide and self._thread is None and cores != torch.get_num_threads():
            self._thread = threading.get_ident()
            self._before = torch.get_num_threads()
            torch.set_num_threads(cores)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None and self._thread == threading.get_ident():
            torch.set_num_threads(self._before)
        self._before = self._thread = None


def all_cores(enabled: bool = True) -> Widening:
    """Torch intra-op threads = usable cores for the block, then back to the setting before."""
    return Widening(enabled)


def run_forward(model: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device,
                every_core: bool = False) -> dict[str, torch.Tensor]:
    """A forward on the executor thread; outputs named and on the CPU. ``every_core``: on the
    CPU, torch's intra-op threads = usable cores for this forward (all_cores)."""
    try:
        with torch.inference_mode(), all_cores(every_core and device.type == "cpu"):
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


def inputs_meta(spec: ModelSpec) -> list[TensorSpec]:
    """V2 metadata ([{name, datatype, shape}]) of the inputs the model's forward takes."""
    return [
        TensorSpec(name=n, datatype=V2_TYPES.get(dt, "FP32"), shape=list(shape))
        for n, (shape, dt) in spec.example_inputs.items()
    ]


def io_spec(spec: ModelSpec, outputs: dict[str, torch.Tensor] | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input metadata, and output metadata named from a forward's outputs."""
    outs = [
        TensorSpec(name=n, datatype=V2_TYPES.get(t.dtype, "FP32"), shape=[-1] * t.dim())
        for n, t in (outputs or {}).items()
    ]
    return inputs_meta(spec), outs


def pad_token(spec: ModelSpec) -> int | None:
    """The token that pads shorter sequences to a batch's length, or None: never pad.

    Only a model whose forward takes ``attention_mask`` (so padded positions are masked out)
    and whose config names a ``pad_token_id`` may be padded; others batch equal lengths only.
    Imports the model's class: call it off the event loop.
    """
    pad = spec.config.get("pad_token_id")
    if not isinstance(pad, int) or isinstance(pad, bool) or spec.kind != "transformers":
        return None
    from cicada_async.engine import hfimport

    cls = hfimport.find(spec.architecture)  # a worker thread: see hfimport for why not getattr(transformers, ...)
    forward = getattr(cls, "forward", None)
    try:
        takes_mask = forward is not None and "attention_mask" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_mask = False
    return pad if takes_mask else None
