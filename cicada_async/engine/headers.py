"""Parse and validate a safetensors header before any tensor is built from its bytes."""

from __future__ import annotations

import json
from dataclasses import replace
from collections.abc import Mapping
from typing import Any

from protocols.errors import CheckpointError
from protocols.manifest import FileHeader, TensorEntry
from protocols.storage import StorageBackend

# One read usually gets the length prefix and the whole header.
HEADER_PROBE = 64 << 10
# The same ceiling the safetensors library applies; a larger header is an attack or an error.
MAX_HEADER_BYTES = 100_000_000

# Every dtype code the safetensors format defines -> bits per element. ``cicada pack`` copies
# any of them; the loader takes only LOADABLE_DTYPES.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

# The dtypes the loader builds tensors of (their torch dtypes: tensorbytes.TORCH_DTYPES).
LOADABLE_DTYPES: dict[str, int] = {
    k: DTYPE_BITS[k]
    for k in ("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "U16", "I16", "F16", "BF16",
              "U32", "I32", "F32", "U64", "I64", "F64")
}


def header_length(prefix: bytes, *, key: str, size: int) -> int:
    """The JSON header length announced by the first 8 bytes of a file of ``size`` bytes."""
    if size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{key}: {size} bytes is too short for a safetensors file")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{key}: header length {n} exceeds the limit of {MAX_HEADER_BYTES}")
    if 8 + n > size:
        raise CheckpointError(f"{key}: header length {n} runs past the end of the {size}-byte file")
    return n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate tensor name {k!r} in the header")
        out[k] = v
    return out


def parse_header(
    raw: bytes, *, key: str, size: int, version: str | None = None,
    dtypes: Mapping[str, int] = LOADABLE_DTYPES,
) -> FileHeader:
    """Validate header bytes (without the 8-byte prefix) of a file of ``size`` bytes.

    ``dtypes`` (code -> bits per element) are the dtypes accepted: by default those the loader
    maps to torch; ``cicada pack``, which only copies bytes, passes all of ``DTYPE_BITS``.
    """
    data_offset = 8 + len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{key}: header is not UTF-8 (is this a safetensors file?)") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{key}: header is not valid JSON ({e.args[0][:80]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{key}: header is not a JSON object")

    metadata: dict[str, str] = {}
    entries: list[TensorEntry] = []
    for name, spec in obj.items():
        if name == "__metadata__":
            if not isinstance(spec, Mapping) or not all(
                isinstance(v, str) for v in spec.values()
            ):
                raise CheckpointError(f"{key}: __metadata__ must map strings to strings")
            metadata = dict(spec)
            continue
        entries.append(_entry(name, spec, key=key, data_offset=data_offset, dtypes=dtypes))

    # Sorted by offset, tensors must tile the data section exactly: no gap, no overlap, and
    # nothing after the last one (trailing bytes are how polyglot files hide a payload).
    entries.sort(key=lambda e: (e.start, e.end))
    pos = data_offset
    for t in entries:
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else "leaves a gap before it"
            raise CheckpointError(f"{key}: tensor {t.name!r} {what} (offset {t.start - data_offset})")
        pos = t.end
    if pos != size:
        if pos > size:
            raise CheckpointError(
                f"{key}: tensors need {pos} bytes but the file has {size} (truncated)"
            )
        raise CheckpointError(f"{key}: {size - pos} unexpected bytes after the last tensor")
    return FileHeader(
        key=key,
        size=size,
        version=version,
        data_offset=data_offset,
        tensors={t.name: t for t in entries},
        metadata=metadata,
    )


def _entry(name: str, spec: Any, *, key: str, data_offset: int, dtypes: Mapping[str, int]) -> TensorEntry:
    if not isinstance(spec, Mapping):
        raise CheckpointError(f"{key}: entry for {name!r} is not an object")
    dtype = spec.get("dtype")
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise CheckpointError(f"{key}: tensor {name!r} has unknown dtype {dtype!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{key}: tensor {name!r} has an invalid shape {shape!r}")
    offsets = spec.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise CheckpointError(f"{key}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{key}: tensor {name!r} ends before it starts")
    bits = dtypes[dtype]
    for d in shape:
        bits *= d
        if bits > 1 << 65:  # 2**62 bytes. Python ints do not overflow; the library's u64 would
            raise CheckpointError(f"{key}: tensor {name!r} shape {shape} overflows")
    if bits != 8 * (end - begin):
        need = bits // 8 if bits % 8 == 0 else bits / 8  # F4 and F6 pack several to a byte
        raise CheckpointError(
            f"{key}: tensor {name!r} is {end - begin} bytes but {dtype}{shape} needs {need}"
        )
    return TensorEntry(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        file=key,
        start=data_offset + begin,
        end=data_offset + end,
    )


async def read_header(backend: StorageBackend, key: str) -> FileHeader:
    info = await backend.stat(key)
    probe = bytearray(min(info.size, HEADER_PROBE))
    await backend.read_into(key, 0, memoryview(probe), version=info.version)
    n = header_length(bytes(probe[:8]), key=key, size=info.size)
    if 8 + n > len(probe):
        rest = bytearray(8 + n - len(probe))
        await backend.read_into(key, len(probe), memoryview(rest), version=info.version)
        probe += rest
    h = parse_header(bytes(probe[8 : 8 + n]), key=key, size=info.size, version=info.version)
    return replace(h, raw=bytes(probe[: 8 + n]))


def all_tensors(hdrs: Mapping[str, FileHeader]) -> dict[str, TensorEntry]:
    """Every tensor of every file by name; a name in two files is an error."""
    tensors: dict[str, TensorEntry] = {}
    for h in hdrs.values():
        for name, e in h.tensors.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} and {e.file}")
            tensors[name] = e
    return tensors
