"""What a request must satisfy before it reaches the scheduler, whatever transport carried it.

A model name and version (HTTP path, gRPC message), inputs against the published metadata,
requested outputs against the configured ones; and the forward's refusal of an unknown keyword
turned back into the caller's error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from cicada_async.service.config import MODEL_NAME_RE, ModelConfig
from protocols import v2
from protocols.errors import BadRequest, CicadaError, InferenceError, ModelNotFound
from protocols.serving import ServedModel


def check_name(name: str, version: str | None = None) -> str:
    """A model name from a request (HTTP path, gRPC message), checked; any version but 1 is 404."""
    # Names are only ever looked up, never turned into paths; the pattern keeps them printable.
    if not MODEL_NAME_RE.match(name):
        raise BadRequest(f"invalid model name {name!r}")
    if version not in (None, "", "1"):
        raise ModelNotFound(f"model {name!r} has no version {version!r} (only version 1)")
    return name


def check_inputs(cfg: ModelConfig, instance: ServedModel, inputs: Mapping[str, torch.Tensor]) -> None:
    """Refuse inputs that contradict the published metadata before they reach the engine.

    A bad first request would otherwise fail the cold start that every queued request shares.
    Names are checked only against metadata from the config (the engine's derived metadata
    lists the example inputs, not every optional keyword a forward accepts).
    """
    rows = {t.shape[0] for t in inputs.values() if t.dim()}
    if cfg.max_batch_size and rows and max(rows) > cfg.max_batch_size:
        # As Triton: a batching model's first dimension is the batch, bounded by max_batch_size.
        raise BadRequest(f"batch size {max(rows)} exceeds the model's max_batch_size ({cfg.max_batch_size})")
    specs: dict[str, tuple[str, list[int]]]
    if cfg.inputs:
        specs = {s.name: (s.datatype, list(s.shape)) for s in cfg.inputs}
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise BadRequest(f"unknown input(s) {', '.join(map(repr, unknown))} (model inputs: {', '.join(specs)})")
    else:
        try:
            specs = {s["name"]: (s["datatype"], list(s["shape"])) for s in instance.io_spec()[0]}
        except CicadaError:
            return
    for name, t in inputs.items():
        spec = specs.get(name)
        if spec is None:
            continue
        want, shape = spec
        datatype = v2.TORCH_TO_V2.get(t.dtype)
        if datatype != want:
            raise BadRequest(f"input {name!r} must be {want}, got {datatype}")
        # Rank only: derived metadata may pin example sizes that the model does not require.
        if len(shape) != t.dim():
            raise BadRequest(f"input {name!r} has shape {list(t.shape)}, model expects {shape}")


def check_outputs(cfg: ModelConfig, requested: list[v2.RequestedOutput] | None) -> None:
    """Refuse an unknown output name before computing, when the config lists the outputs.

    Without configured outputs, ``v2.select_outputs`` names it after the forward (the
    engine knows a model's outputs only once it ran).
    """
    if cfg.outputs and requested:
        known = [s.name for s in cfg.outputs]
        unknown = sorted({r.name for r in requested} - set(known))
        if unknown:
            raise BadRequest(f"unknown output(s) {', '.join(map(repr, unknown))} (model outputs: {', '.join(known)})")


_KWARG = re.compile(r"unexpected keyword argument '([^']+)'")


def unknown_input(e: InferenceError, inputs: Mapping[str, torch.Tensor]) -> BadRequest | None:
    """A forward that refused a keyword was sent an input it does not take: the caller's 400.

    Derived metadata cannot list every optional keyword of a transformers forward, so the
    forward's own signature check is the authority; its TypeError (a 500 naming a class)
    becomes a 400 naming the input.
    """
    m = _KWARG.search(str(e)) if isinstance(e.__cause__, TypeError) else None
    if m is None or m.group(1) not in inputs:
        return None
    return BadRequest(f"unknown input {m.group(1)!r}: the model's forward does not take it")
