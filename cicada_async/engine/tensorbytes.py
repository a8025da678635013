"""Landed bytes to tensors: safetensors dtype codes as torch dtypes, and the one view or copy.

A bottom module: it imports nothing from the engine, so where bytes land (``landing``) and what
is built from them (``skeleton``) both depend on it and not on each other.
"""

from __future__ import annotations

import torch

from protocols.manifest import TensorEntry

# safetensors dtype code -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

# Floating dtypes a requested serving dtype converts (F8 and integers never are).
CONVERTIBLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def tensor_from_bytes(
    raw: torch.Tensor, entry: TensorEntry, *, dtype: torch.dtype | None, device: torch.device
) -> torch.Tensor:
    """The tensor for ``entry`` from its raw uint8 bytes; a view when nothing needs converting."""
    src_dtype = TORCH_DTYPES[entry.dtype]
    if raw.data_ptr() % src_dtype.itemsize == 0:
        t = raw.view(src_dtype).view(entry.shape)
    else:  # misaligned in the file: one copy into aligned memory
        t = raw.clone().view(src_dtype).view(entry.shape)
    # Only plain floats convert, as in transformers: integers and F8 keep their dtype.
    want = dtype if (dtype is not None and src_dtype in CONVERTIBLE) else src_dtype
    if want != src_dtype or t.device != device:
        t = t.to(device=device, dtype=want, non_blocking=device.type == "cuda")
    return t
