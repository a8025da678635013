"""Execution plan: the order modules run in, each module's shard, and coalesced reads."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from protocols.manifest import Plan, ReadRange, Shard, TensorEntry

from .miniloader import SkeletonIndex
from .modeldir import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_READ_BYTES = 8 << 20
# Gaps up to this are read rather than skipped: one request beats two on every backend.
MAX_GAP_BYTES = 256 << 10


def execution_order(
    model: nn.Module, spec: ModelSpec, planned: list[str]
) -> tuple[list[str], str, list[str]]:
    """Planned module names in the order a dry forward on ``meta`` first calls them.

    Falls back to registration order when the forward cannot run on meta tensors.
    """
    modules = dict(model.named_modules())
    seen: dict[str, None] = {}
    handles = []
    for name in planned:
        mod = modules.get(name)
        if mod is None:
            continue

        def hook(_m: nn.Module, _a: object, name: str = name) -> None:
            seen.setdefault(name, None)

        handles.append(mod.register_forward_pre_hook(hook))
    # Buffers are real; the dry run needs every tensor on meta, so swap them for the call.
    saved = [(m, dict(m._buffers)) for m in model.modules() if m._buffers]
    # Data-dependent checks (mask shortcuts, ``if x.any()``) cannot be answered on meta; any
    # answer will do, since only the order of module calls is recorded.
    patched = {n: getattr(torch.Tensor, n) for n in ("item", "__bool__", "tolist")}

    def _meta_safe(n: str):  # type: ignore[no-untyped-def]
        orig = patched[n]

        def f(self: torch.Tensor, *a: object, **k: object) -> object:
            if self.is_meta:
                return False if n == "__bool__" else (0 if n == "item" else [])
            return orig(self, *a, **k)

        return f

    try:
        for n in patched:
            setattr(torch.Tensor, n, _meta_safe(n))
        for m, bufs in saved:
            for k, b in bufs.items():
                if b is not None:
                    m._buffers[k] = b.to("meta")
        with torch.no_grad():
            model(**spec.dummy_inputs(device="meta"))
        source = "dry-forward"
    except Exception as e:  # any failure of a meta forward just means: no order from it
        log.info("dry forward on meta failed (%s: %s); using registration order", type(e).__name__, e)
        seen.clear()
        source = "registration"
    finally:
        for n, f in patched.items():
            setattr(torch.Tensor, n, f)
        for h in handles:
            h.remove()
        for m, bufs in saved:
            m._buffers.update(bufs)
    uncalled = [n for n in planned if n not in seen]
    # Without a dry run every module keeps its own gate; "uncalled" means seen not to run.
    return list(seen) + uncalled, source, uncalled if seen else []


def build_plan(
    model: nn.Module,
    spec: ModelSpec,
    index: SkeletonIndex,
    tensors: Mapping[str, TensorEntry],
    file_sizes: Mapping[str, int],
    *,
    read_bytes: int = DEFAULT_READ_BYTES,
    alignment: int = 1,
    order: list[str] | None = None,
) -> Plan:
    """Shards in execution order and the reads that fetch them."""
    planned = [m for m in (n for n, _ in model.named_modules()) if index.module_slots.get(m)]
    uncalled: list[str] = []
    if order is None:
        order, source, uncalled = execution_order(model, spec, planned)
    else:
        source = "given"
    taken: set[str] = set()
    groups: list[tuple[str, list[str]]] = []
    for mname in order:
        names = [t for t in index.module_slots.get(mname, []) if t not in taken]
        if names:
            taken.update(names)
            groups.append((mname, sorted(names, key=lambda t: (tensors[t].file, tensors[t].start))))
    rest = sorted(set(index.slots) - taken)
    if rest:  # owned by no planned module: fetch them last
        groups.append(("", rest))

    reads, shard_reads = plan_reads(
        list(enumerate(names for _, names in groups)), tensors, file_sizes,
        read_bytes=read_bytes, alignment=alignment,
    )
    shards = tuple(
        Shard(i, mname, tuple(names), tuple(shard_reads.get(i, ())), sum(tensors[t].nbytes for t in names))
        for i, (mname, names) in enumerate(groups)
    )
    if rest:
        uncalled.append("")
    return Plan(
        modules=tuple(order), shards=shards, reads=tuple(reads), order_source=source,
        uncalled=tuple(uncalled),
    )


def plan_reads(
    groups: list[tuple[int, Sequence[str]]],
    tensors: Mapping[str, TensorEntry],
    file_sizes: Mapping[str, int],
    *,
    read_bytes: int,
    alignment: int,
    first: int = 0,
) -> tuple[list[ReadRange], dict[int, list[int]]]:
    """Coalesced reads for shards in the given order; read indices start at ``first``.

    Consecutive shards are grouped into windows of about ``read_bytes``; within a window the
    byte ranges are merged (small gaps included) and split into aligned pieces, so a layer's
    small tensors cost one request and a large tensor several, none much above ``read_bytes``.
    """
    reads: list[ReadRange] = []
    shard_reads: dict[int, list[int]] = {}
    names_of = dict(groups)
    window: list[int] = []
    window_bytes = 0
    step = max(alignment, read_bytes - read_bytes % alignment)

    def flush() -> None:
        nonlocal window_bytes
        if not window:
            return
        spans = sorted((tensors[t].file, tensors[t].start, tensors[t].end, s) for s in window for t in names_of[s])
        merged: list[list[Any]] = []  # [file, start, end, set(shards)]
        for f, a, b, s in spans:
            if merged and merged[-1][0] == f and a - merged[-1][2] <= MAX_GAP_BYTES:
                merged[-1][2] = max(merged[-1][2], b)
                merged[-1][3].add(s)
            else:
                merged.append([f, a, b, {s}])
        rank = {s: i for i, s in enumerate(window)}
        pieces = []
        for f, a, b, shards in merged:
            a -= a % alignment
            b = min(file_sizes[f], -(-b // alignment) * alignment)
            lo = a
            while lo < b:
                hi = min(b, lo + step)
                if b - hi < step // 4:  # no runt piece at the end
                    hi = b
                served = tuple(sorted(
                    (s for s in shards if any(
                        tensors[t].file == f and tensors[t].start < hi and tensors[t].end > lo
                        for t in names_of[s])),
                    key=rank.__getitem__,
                ))
                pieces.append((rank[served[0]] if served else 0, f, lo, hi, served))
                lo = hi
        # Within a window, fetch what the earliest shard needs first.
        for _, f, lo, hi, served in sorted(pieces, key=lambda p: (p[0], p[1], p[2])):
            for s in served:
                shard_reads.setdefault(s, []).append(first + len(reads))
            reads.append(ReadRange(f, lo, hi, served))
        window.clear()
        window_bytes = 0

    for i, names in groups:
        nbytes = sum(tensors[t].nbytes for t in names)
        if window and window_bytes + nbytes > read_bytes:
            flush()
        window.append(i)
        window_bytes += nbytes
    flush()
    return reads, shard_reads


def reorder(
    plan: Plan,
    order: Sequence[str],
    admitted: int,
    tensors: Mapping[str, TensorEntry],
    file_sizes: Mapping[str, int],
    *,
    read_bytes: int,
    alignment: int,
    source: str,
    uncalled: Sequence[str],
) -> Plan:
    """The same shards with reads not yet admitted re-planned in ``order``.

    Reads up to the end of every window already started are kept as they are, so a shard is
    always fetched by the reads of one plan.
    """
    keep = admitted
    while True:
        touched = {s for r in plan.reads[:keep] for s in r.shards}
        need = max((max(plan.shards[s].reads) + 1 for s in touched if plan.shards[s].reads), default=0)
        if need <= keep:
            break
        keep = need
    pos = {m: i for i, m in enumerate(order)}
    remaining = sorted(
        (s for s in plan.shards if s.index not in touched),
        key=lambda s: (pos.get(s.module, len(pos)), s.index),
    )
    reads, shard_reads = plan_reads(
        [(s.index, s.tensors) for s in remaining], tensors, file_sizes,
        read_bytes=read_bytes, alignment=alignment, first=keep,
    )
    shards = tuple(
        s if s.index in touched else replace(s, reads=tuple(shard_reads.get(s.index, ())))
        for s in plan.shards
    )
    return Plan(tuple(order), shards, plan.reads[:keep] + tuple(reads), source, tuple(uncalled))


def format_plan(plan: Plan) -> str:
    """A human-readable listing for ``cicada plan``."""
    lines = [
        f"order from {plan.order_source}: {len(plan.shards)} shards, {len(plan.reads)} reads, "
        f"{plan.nbytes / 1e6:.1f} MB"
    ]
    for s in plan.shards:
        lines.append(
            f"  shard {s.index:4d}  {s.module or '<root>':50s} {s.nbytes / 1e6:9.3f} MB  "
            f"{len(s.tensors):3d} tensors  reads {list(s.reads)[:6]}{'...' if len(s.reads) > 6 else ''}"
        )
    for i, r in enumerate(plan.reads):
        lines.append(f"  read {i:4d}  {r.file}[{r.start}:{r.end}]  {r.nbytes / 1e6:8.3f} MB  shards {list(r.shards)}")
    return "\n".join(lines)
