"""Parse and validate a safetensors header before any tensor is built from its bytes."""

from __future__ import annotations

import json
import struct
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

# safetensors dtype code -> bytes per element (torch dtype names live in skeleton.py).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


def header_length(prefix: bytes, *, key: str, size: int) -> int:
    """The JSON header length announced by the first 8 bytes of a file of ``size`` bytes."""
    if size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{key}: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", prefix[:8])
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
    raw: bytes, *, key: str, size: int, version: str | None = None
) -> FileHeader:
    """Validate header bytes (without the 8-byte prefix) of a file of ``size`` bytes."""
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
        entries.append(_entry(name, spec, key=key, data_offset=data_offset))

    # Sorted by offset, tensors must tile the data section exactly: no gap, no overlap, and
    # nothing after the last one (trailing bytes are how polyglot files hide a payload).
    entries.sort(key=lambda e: (e.start, e.end))
    pos = data_offset
    for e in entries:
        if e.start != pos:
            what = "overlaps the previous tensor" if e.start < pos else "leaves a gap before it"
            raise CheckpointError(f"{key}: tensor {e.name!r} {what} (offset {e.start - data_offset})")
        pos = e.end
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
        tensors={e.name: e for e in entries},
        metadata=metadata,
    )


def _entry(name: str, spec: Any, *, key: str, data_offset: int) -> TensorEntry:
    if not isinstance(spec, Mapping):
        raise CheckpointError(f"{key}: entry for {name!r} is not an object")
    dtype = spec.get("dtype")
    if dtype not in DTYPE_SIZES:
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
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
        if n > 1 << 62:  # Python ints do not overflow; the library's u64 arithmetic would
            raise CheckpointError(f"{key}: tensor {name!r} shape {shape} overflows")
    if n != end - begin:
        raise CheckpointError(
            f"{key}: tensor {name!r} is {end - begin} bytes but {dtype}{shape} needs {n}"
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
