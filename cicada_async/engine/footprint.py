"""What a model holds once served: bytes per device, as the repository's budget charges them.

A serving dtype changes the bytes: an fp32 checkpoint served as bfloat16 holds half its file
size, a bf16 one served as float32 twice. The budget must charge what is held, not what was read.
"""

from __future__ import annotations

import torch
from torch import nn

from protocols.manifest import TensorEntry

from cicada_async.engine.tensorbytes import CONVERTIBLE, TORCH_DTYPES


def served_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers per device ("cpu", "cuda:0", ...).

    A tensor is counted once however many modules share it (tied weights); tensors that view one
    landed arena each count their own span.
    """
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.is_meta:
            continue
        dev = str(t.device)
        key = (dev, t.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        out[dev] = out.get(dev, 0) + t.numel() * t.element_size()
    return out


def estimated_bytes(tensors: list[TensorEntry], dtype: torch.dtype | None) -> int:
    """Served bytes expected from the checkpoint's tensors under serving ``dtype`` (None: as
    stored). Plain floats convert, integers and F8 keep theirs (as tensorbytes converts)."""
    total = 0
    for e in tensors:
        src = TORCH_DTYPES[e.dtype]
        if dtype is not None and src in CONVERTIBLE:
            total += e.nbytes // src.itemsize * dtype.itemsize
        else:
            total += e.nbytes
    return total
