"""Rewrite a safetensors checkpoint in execution order and describe it in a manifest.

A packed checkpoint lets the loader read each file front to back while layers compute: the
tensors the first layers need come first. ``cicada.manifest.json`` carries per-file sizes and
SHA-256 digests, because ranged reads carry no whole-object checksum (S3 ETags are not digests).

Packing streams tensor bytes through one fixed-size buffer, so memory stays bounded whatever
the model size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from protocols.errors import CheckpointError

from cicada_async.engine.headers import DTYPE_BITS, header_length, parse_header
from cicada_async.engine.manifest import MANIFEST_NAME, no_duplicate_keys

if TYPE_CHECKING:
    from protocols.manifest import Plan

    from cicada_async.engine.modeldir import ModelSpec

INDEX_NAME = "model.safetensors.index.json"
COPY_BUFFER_BYTES = 8 << 20
# The data section starts at a multiple of this: the header is padded with spaces (which
# safetensors allows and itself does, to 8) so the first tensor lands cache-line and
# O_DIRECT-friendly. Tensors stay contiguous after it: the format forbids gaps.
DATA_ALIGN = 64
PLAN_DIR = ".cicada"  # plancache.PLAN_DIR; not imported, so that pack does not import torch


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor's bytes are in the source checkpoint."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset in ``file``
    nbytes: int


def read_header(path: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    """Tensors of one safetensors file in data order, and its ``__metadata__``.

    Checked by the loader's own parser (``headers``), so pack refuses what a load would, except
    that any dtype of the format is copied, not only those the loader maps to torch.
    """
    key = str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = header_length(f.read(8), key=key, size=size)
        raw = f.read(n)
    header = parse_header(raw, key=key, size=size, dtypes=DTYPE_BITS)
    tensors = [SourceTensor(t.name, t.dtype, t.shape, path, t.start, t.nbytes) for t in header.tensors.values()]
    return tensors, dict(header.metadata)


def _sources(src: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The weight files in order, and the parsed index when the checkpoint is sharded."""
    index_path = src / INDEX_NAME
    if index_path.exists():
        index = json.loads(index_path.read_text(), object_pairs_hook=no_duplicate_keys)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name:
                raise CheckpointError(f"{index_path}: shard {name!r} is not a plain file name")
        return [src / f for f in files], index
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no .safetensors files")
    return files, None


def _header_bytes(tensors: Iterable[SourceTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


class _HashingWriter:
    """Writes a file and its SHA-256 in one pass, so the manifest needs no re-read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)


def _write_file(
    dst: Path, tensors: list[SourceTensor], metadata: dict[str, str], buf: bytearray
) -> dict[str, Any]:
    tmp = dst.with_name(dst.name + ".partial")
    handles: dict[Path, io.BufferedReader] = {}
    view = memoryview(buf)
    try:
        with open(tmp, "wb") as out:
            w = _HashingWriter(out)
            w.write(_header_bytes(tensors, metadata))
            for t in tensors:
                f = handles.get(t.file)
                if f is None:
                    f = handles[t.file] = open(t.file, "rb")
                f.seek(t.start)
                left = t.nbytes
                while left:
                    n = f.readinto(view[: min(left, len(view))])
                    if not n:
                        raise CheckpointError(f"{t.file}: ended inside tensor {t.name!r}")
                    w.write(view[:n])
                    left -= n
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    finally:
        for f in handles.values():
            f.close()
        tmp.unlink(missing_ok=True)
    return {"size": w.size, "sha256": w.sha.hexdigest()}


def _copy_file(src: Path, dst: Path, buf: bytearray) -> dict[str, Any]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(buf)
    with open(src, "rb") as f, open(dst, "wb") as out:
        w = _HashingWriter(out)
        while n := f.readinto(view):
            w.write(view[:n])
    shutil.copystat(src, dst)
    return {"size": w.size, "sha256": w.sha.hexdigest()}


def _resolve_order(tensors: list[SourceTensor], order: list[str] | None) -> list[SourceTensor]:
    by_name = {t.name: t for t in tensors}
    if order is None:
        return tensors
    if len(set(order)) != len(order):
        raise CheckpointError("the order names a tensor twice")
    unknown = [n for n in order if n not in by_name]
    if unknown:
        raise CheckpointError(f"the order names tensors not in the checkpoint: {unknown[:5]}")
    chosen = set(order)
    # Tensors the order leaves out (unused buffers, tied copies) go last, in file order.
    return [by_name[n] for n in order] + [t for t in tensors if t.name not in chosen]


def _split(tensors: list[SourceTensor], n_files: int) -> list[list[SourceTensor]]:
    """Consecutive groups of about equal bytes, so each shard holds a stretch of execution."""
    total = sum(t.nbytes for t in tensors)
    groups: list[list[SourceTensor]] = [[] for _ in range(n_files)]
    done = 0
    for t in tensors:
        i = min(n_files - 1, done * n_files // total) if total else 0
        groups[i].append(t)
        done += t.nbytes
    return groups


def pack(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    order: list[str] | None = None,
    *,
    buffer_bytes: int = COPY_BUFFER_BYTES,
    plan: tuple[ModelSpec, Plan] | None = None,
) -> dict[str, Any]:
    """Write ``src_dir``'s checkpoint into ``dst_dir`` with tensors in ``order``; return the
    manifest (also written to ``dst_dir/cicada.manifest.json``).

    ``order`` lists tensor names in execution order; names it leaves out follow in file order;
    ``None`` keeps file order. A sharded checkpoint keeps its shard names and count, but the
    shards are refilled in order so that shard 1 holds the first tensors executed.
    Other files (config.json, tokenizer...) are copied as they are, except the source's plan
    files (``.cicada/``). With ``plan`` (the spec and the plan that gave ``order``), the plan
    file for the packed layout is written into ``dst_dir/.cicada/`` (not in the manifest: a
    plan file is checked against the skeleton when read, and can only cost speed).
    """
    src, dst = Path(src_dir).resolve(), Path(dst_dir).resolve()
    if src == dst:
        raise CheckpointError("pack needs a destination other than the source")
    files, index = _sources(src)
    all_tensors: list[SourceTensor] = []
    metadata: dict[str, str] = {}
    for path in files:
        tensors, meta = read_header(path)
        metadata = metadata or meta
        all_tensors += tensors
    names = [t.name for t in all_tensors]
    if len(set(names)) != len(names):
        raise CheckpointError("a tensor name appears in more than one shard")
    if index is not None:
        mapped = set(index["weight_map"])
        if mapped != set(names):
            raise CheckpointError(f"{INDEX_NAME} does not list exactly the tensors in its shards")
    ordered = _resolve_order(all_tensors, order)

    dst.mkdir(parents=True, exist_ok=True)
    buf = bytearray(buffer_bytes)
    manifest_files: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    layout: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for path, group in zip(files, _split(ordered, len(files))):
        key = path.relative_to(src).as_posix()
        manifest_files[key] = _write_file(dst / key, group, metadata, buf)
        weight_map.update({t.name: key for t in group})
        layout[key] = [(t.name, t.dtype, t.shape) for t in group]

    # Symlinked files are copied as their targets (a Hugging Face cache snapshot is all links).
    skip = set(files) | {src / INDEX_NAME, src / MANIFEST_NAME}
    for path in sorted(src.rglob("*")):
        inside_dst = path.is_relative_to(dst)  # dst may live under src
        plan_file = path.relative_to(src).parts[0] == PLAN_DIR  # keyed on the source's layout
        if path.is_file() and path not in skip and not inside_dst and not plan_file:
            key = path.relative_to(src).as_posix()
            manifest_files[key] = _copy_file(path, dst / key, buf)
    if index is not None:
        new_index = {
            **index,
            "metadata": {
                **(index.get("metadata") or {}),
                "total_size": sum(t.nbytes for t in ordered),
            },
            "weight_map": weight_map,
        }
        data = json.dumps(new_index, indent=2).encode()
        (dst / INDEX_NAME).write_bytes(data)
        manifest_files[INDEX_NAME] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    manifest = {"files": dict(sorted(manifest_files.items())), "order": [t.name for t in ordered]}
    tmp = dst / (MANIFEST_NAME + ".partial")
    tmp.write_bytes(json.dumps(manifest, indent=1).encode())
    os.replace(tmp, dst / MANIFEST_NAME)
    if plan is not None:
        from cicada_async.engine.plancache import plan_file_name, plan_key, write_plan

        spec, order_plan = plan
        key = plan_key(spec, layout, None)  # what a load serving the checkpoint's dtype looks up
        write_plan(dst / PLAN_DIR / plan_file_name(key), key, order_plan)
    return manifest
