"""The forward on the executor thread, and naming what a forward returns."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
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
    """Torch threads of a forward: as set until ``idle()`` says no load fetches, every usable
    core from then on (checked on entry and at each ``check``: a gated forward's layer gates),
    back to the setting at the end.

    The free core was kept for the fetch threads and the loop; a cold start's forward that
    outlives the fetch (weights in the page cache or prefetched, or a batch of requests riding
    the load) would otherwise finish on cores - 1 threads. On this executor thread only.
    """

    def __init__(self, idle: Callable[[], bool] | None) -> None:
        self._idle = idle
        self._before: int | None = None

    def check(self) -> None:
        if self._idle is None or self._before is not None or not self._idle():
            return
        cores = usable_cores()
        if cores > torch.get_num_threads():
            self._before = torch.get_num_threads()
            torch.set_num_threads(cores)

    def __enter__(self) -> "Widening":
        self.check()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None


def all_cores(enabled: bool = True) -> Widening:
    """Torch intra-op threads = usable cores for the block, then back (this thread's setting).

    The server keeps one core for the fetch threads and the event loop while a load fetches
    (torch threads = cores - 1); a forward with nothing left to fetch needs neither. Set on the
    thread that computes only: the loop's own small tensor ops stay on one thread.
    """
    return Widening((lambda: True) if enabled else None)


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
    import transformers

    cls = getattr(transformers, spec.architecture, None)
    forward = getattr(cls, "forward", None)
    try:
        takes_mask = forward is not None and "attention_mask" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_mask = False
    return pad if takes_mask else None
