"""How the generation loop calls a causal LM's forward: the argument names that model takes,
and the last position's logits of one step (prefill or decode), on the executor."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from protocols.errors import CicadaError, InferenceError

if TYPE_CHECKING:  # transformers is imported on the executor, never at the engine's import
    from transformers.cache_utils import DynamicCache


@dataclass(frozen=True)
class LmCall:
    cache_arg: str  # "past_key_values", or "cache" in some remote-code models
    keep_arg: bool  # the forward takes ``logits_to_keep``

    @classmethod
    def of(cls, model: nn.Module) -> LmCall:
        params = inspect.signature(model.forward).parameters
        return cls("cache" if "cache" in params else "past_key_values", "logits_to_keep" in params)

    def logits(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
               positions: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        """The last position's logits [rows, vocab]; on the executor, under inference_mode."""
        kwargs: dict[str, object] = {"input_ids": ids, "position_ids": positions, self.cache_arg: cache,
                                     "use_cache": True}  # the served config says use_cache=False
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self.keep_arg:
            kwargs["logits_to_keep"] = 1  # as transformers' generate: the head on the last position only
        try:
            out = model(**kwargs)
        except CicadaError:
            raise
        except Exception as e:  # noqa: BLE001 - any forward failure is the model's
            raise InferenceError(f"forward failed: {type(e).__name__}: {e}") from e
        logits: torch.Tensor = out.logits[:, -1]
        return logits
