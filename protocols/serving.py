"""The serving seam: what the data plane needs of the engine and of a served model.

The service (``cicada_async.service``) holds an engine and its model instances only through
these types; the engine (``cicada_async.engine.runtime``) implements them, and so do the test
doubles. One ``Priority`` scale runs from the wire to the executor and the fetch scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, TypedDict

import torch

from protocols.generation import GenerativeModel
from protocols.priority import Priority

__all__ = ["Priority"]  # re-exported: the scale's home is protocols.priority




@dataclass(frozen=True)
class ModelOptions:
    """How one model is served: the config's choices, checked by the engine when it loads."""

    dtype: str | None = None
    """"float32", "bfloat16" or "float16"; None serves the checkpoint's dtype."""
    device: str = "cpu"
    """"cpu" or "cuda[:N]"."""
    kv_cache_bytes: int = 256 << 20
    """A causal LM's KV cache budget: sequences wait (or are shed) beyond it. Counted in the
    memory budget with the weights."""
    max_sequences: int = 16
    """Sequences of one model generating at once (its continuous batch), at most."""


ModelState = Literal["unloaded", "loading", "ready", "failed"]
Tensors = dict[str, torch.Tensor]
# A forward's inputs, or a callable that returns them when the forward starts (so that a
# cold start's batch can form late, when its gated forward begins).
Inputs = Tensors | Callable[[], Tensors]


class TensorSpec(TypedDict):
    """One input or output as model metadata lists it (V2 names)."""

    name: str
    datatype: str
    shape: list[int]


class LoadSummary(Protocol):
    """What the service reports of a model's last cold start."""

    def summary(self) -> dict[str, object]: ...


class ServedModel(GenerativeModel, Protocol):
    """One model the engine can load, run and unload; a causal LM also generates text
    (``GenerativeModel``: the others refuse with ``BadRequest``)."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> ModelState: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def nbytes(self) -> int | None: ...
    @property
    def device_bytes(self) -> Mapping[str, int]:
        """The loaded model's served bytes per device (``str(torch.device)``); empty before its
        first load. The memory budget charges each device its own."""
        ...
    @property
    def last_timeline(self) -> LoadSummary | None: ...
    @property
    def pad_token_id(self) -> int | None:
        """The token that pads a batch of token ids of different lengths; None: no padding."""
        ...

    async def infer(self, inputs: Inputs, *, priority: Priority) -> Tensors: ...
    async def load(self, *, priority: Priority) -> None: ...
    async def unload(self) -> None: ...
    def set_fetch_priority(self, priority: Priority) -> None:
        """The priority of the load's remaining reads (a more urgent request now waits on it)."""
        ...
    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]: ...
    async def size_hint(self) -> int | None:
        """Resident bytes a load will need, known before it fetches (None: unknown)."""
        ...


class ServingEngine(Protocol):
    """The engine as the data plane holds it: an async context that makes model instances."""

    @property
    def healthy(self) -> bool:
        """False while the engine cannot run work (its executor thread died)."""
        ...

    async def __aenter__(self) -> ServingEngine: ...
    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...
    def instance(self, name: str, uri: str, options: ModelOptions) -> ServedModel: ...
    def prebuild(self, model: ServedModel) -> None:
        """Build ``model``'s skeleton ahead, in the background (a no-op where it cannot)."""
        ...
    async def restart_executor(self) -> None:
        """Replace a dead executor; loaded models are dropped."""
        ...

