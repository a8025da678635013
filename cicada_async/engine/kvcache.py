"""The running batch's KV cache: left-padded rows in one transformers ``DynamicCache``.

Continuous batching without a paged allocator: every layer's keys and values are one tensor
[rows, kv_heads, width, head_dim], each row's real tokens right-aligned and the columns before
them padding (zeros, masked out by ``attention_mask``). Rows advance together, one column per
decode step, so the width is always the longest row's real length once leading columns that
are padding in every row are trimmed.

- A new sequence is prefilled alone (batch of 1, as transformers' ``generate`` prefills it) in a
  cache of its own, then merged: both sides left-padded to the common width and stacked. This
  is the only time the whole cache is copied (besides the decode step's own ``torch.cat``, which
  is transformers' ``DynamicLayer.update``).
- The first prefill of a cold model (``coldprefill.py``) is one left-padded batch of every
  sequence that arrived during the load; each row's real columns are cut out of it
  (``split_rows``) and merged as above.
- A finished sequence leaves at once: its row is dropped and leading all-padding columns are
  trimmed in the same copy (``index_select`` of the trimmed view: no storage of the old width
  survives).

Bytes. A row of ``n`` real tokens needs ``n * token_bytes`` (2 x layers x kv_heads x head_dim x
dtype size); the batch allocates ``rows * width * token_bytes``, padding included. With rows of
final lengths L_i (prompt + max_tokens), the width never exceeds max(L_i) over the rows present,
so ``worst_case(rows) = len(rows) * max(L_i) * token_bytes`` bounds what the cache will ever hold
with those rows; admission keeps that within the model's budget. Transient copies (a decode
step's ``torch.cat`` holds old and new tensors of one layer at once, and so does a merge) are
not counted: the budget bounds what stays allocated between steps.

Only full-attention layers (``DynamicLayer``) are supported; a model whose layers slide a window
is served with its context capped at the window (``KVShape.context_cap``), so the window never
takes effect and full attention computes the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported on the executor, never at the engine's import
    from transformers.cache_utils import DynamicCache, DynamicLayer


@dataclass(frozen=True, slots=True)
class KVShape:
    """What one token costs in a model's KV cache."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    context_cap: int | None = None
    """A sliding window (the context is capped below it); None: none."""

    @property
    def token_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def kv_shape(config: Any, dtype: torch.dtype) -> KVShape:
    """From a transformers config (Llama, Qwen2, Mistral, GPT-2 and kin) and the served dtype."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    layer_types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    sliding = any("sliding" in str(t) for t in layer_types) or (
        # Mistral's config names a window without layer_types: every layer slides.
        not layer_types and isinstance(window, int) and getattr(text, "use_sliding_window", True) is not False)
    return KVShape(layers=int(text.num_hidden_layers), kv_heads=kv_heads, head_dim=int(head_dim),
                   dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                   context_cap=int(window) if sliding and isinstance(window, int) else None)


def worst_case_bytes(final_lens: list[int], token_bytes: int) -> int:
    """What a batch of rows of these final lengths (prompt + max_tokens) may ever hold: rows x
    the longest x bytes per token (see the module's docstring). Admission keeps it in budget."""
    return len(final_lens) * max(final_lens, default=0) * token_bytes


def tensors_bytes(cache: DynamicCache | None) -> int:
    """Bytes the cache's tensors hold (their storages, so a view of a wider tensor counts wide)."""
    if cache is None:
        return 0
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                s = t.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
    return total


def new_cache() -> DynamicCache:
    """An empty cache of full-attention layers (no config: no sliding layers), for one
    sequence's prefill."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache()


class BatchCache:
    """The running batch's cache and, per row, how many of its columns are real tokens.

    Owned by the executor thread: every method that touches tensors runs there."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def nbytes(self) -> int:
        return tensors_bytes(self.cache)

    def join(self, single: DynamicCache, length: int) -> None:
        """Append a prefilled sequence's cache (one row of ``length`` tokens) as the last row."""
        self.join_all([(single, length)])

    def join_all(self, singles: list[tuple[DynamicCache, int]]) -> None:
        """Append prefilled sequences' caches (one row of ``length`` tokens each) as the last rows,
        in one copy per layer. Each layer's old tensors, the batch's and the rows', are dropped as
        soon as that layer is copied (the rows' caches are consumed: their layers are emptied), so
        the merge holds one layer twice at most. Joining the rows one at a time held the old and
        the new batch whole (a cold burst of 8 x 512 tokens of llama-small: 100 MB over its cache)
        and copied the batch once per row."""
        if not singles:
            return
        if (self.cache is None or not self.lengths) and len(singles) == 1:
            self.cache, self.lengths = singles[0][0], [singles[0][1]]
            return
        sources = ([self.cache] if self.cache is not None and self.lengths else []) + [c for c, _ in singles]
        for c in sources:
            _layers(c)  # every layer full-attention, before anything is consumed
        lengths = self.lengths + [n for _, n in singles]
        width = max(lengths)
        target = sources[0]
        for i in range(len(target.layers)):
            for attr in ("keys", "values"):
                parts = [getattr(c.layers[i], attr) for c in sources]
                out = _stacked(parts, width)
                for c in sources:
                    setattr(c.layers[i], attr, None)
                setattr(target.layers[i], attr, out)
                del parts
        self.cache, self.lengths = target, lengths

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices, in order); trim the columns no remaining row uses."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        if rows == list(range(self.rows)):
            return
        assert self.cache is not None
        old = self.width
        self.lengths = [self.lengths[i] for i in rows]
        start = old - self.width
        index = torch.tensor(rows, dtype=torch.long)
        for layer, k, v in _layers(self.cache):
            index = index.to(k.device)
            layer.keys = k[:, :, start:].index_select(0, index)
            layer.values = v[:, :, start:].index_select(0, index)

    def step_inputs(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The next decode step's ``attention_mask`` [rows, width + 1] (None when no row has
        padding: what transformers passes without padding) and ``position_ids`` [rows, 1]."""
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=device)
        positions = lengths.unsqueeze(1)  # row r's next token sits at position lengths[r]
        width = self.width
        if all(n == width for n in self.lengths):
            return None, positions
        cols = torch.arange(width + 1, device=device)
        mask = (cols.unsqueeze(0) >= (width - lengths).unsqueeze(1)).long()
        return mask, positions

    def advanced(self) -> None:
        """After a decode step: every row holds one more real token."""
        self.lengths = [n + 1 for n in self.lengths]


def split_rows(cache: DynamicCache, lengths: list[int]) -> list[DynamicCache]:
    """A left-padded batch's cache [B, H, width, D] as B one-row caches of their real columns.

    Copies, not views: a view would keep the whole padded batch alive until its last row joined
    the running batch (and count it whole, ``tensors_bytes``), while rows may wait apart."""
    if len(lengths) == 1 and cache.get_seq_length() == lengths[0]:
        return [cache]
    layers = _layers(cache)
    width = layers[0][1].shape[2]
    out = []
    for r, n in enumerate(lengths):
        row = new_cache()
        for i, (_, k, v) in enumerate(layers):
            row.update(k[r:r + 1, :, width - n:].clone(), v[r:r + 1, :, width - n:].clone(), i)
        out.append(row)
    return out


def _layers(cache: DynamicCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """The cache's layers with their keys and values (each layer holds one row at least)."""
    from transformers.cache_utils import DynamicLayer

    out = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise TypeError(f"only full-attention cache layers batch here, not {type(layer).__name__}")
        out.append((layer, layer.keys, layer.values))
    return out


def _stacked(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Row blocks [b_i, H, w_i, D] right-aligned in one [sum b_i, H, width, D] tensor, zeros to
    their left (one allocation)."""
    _, h, _, d = parts[0].shape
    out = parts[0].new_zeros((sum(p.shape[0] for p in parts), h, width, d))
    r = 0
    for p in parts:
        out[r:r + p.shape[0], :, width - p.shape[2]:] = p
        r += p.shape[0]
    return out
