"""Execution plan: the order modules run in, each module's shard, and coalesced reads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from protocols.manifest import FileHeader, Plan, ReadRange, Shard, TensorEntry

from cicada_async.engine.headers import all_tensors
from cicada_async.engine.patches import ScopedPatch
from cicada_async.engine.reads import DEFAULT_READ_BYTES, MAX_GAP_BYTES
from cicada_async.engine.skeleton import SkeletonIndex
from cicada_async.engine.modeldir import ModelSpec

log = logging.getLogger(__name__)


class DryRunAbandoned(Exception):
    """The dry forward kept asking data-dependent questions, or ran too long: no order from it."""


# A forward that loops on a tensor's value (``while not done:``) would never end on meta, where
# every answer is made up: the dry run gives up after this many answers or seconds.
DRY_RUN_MAX_ANSWERS = 10_000
DRY_RUN_MAX_S = 10.0
_budget = threading.local()


def _spend() -> None:
    _budget.answers += 1
    if _budget.answers > DRY_RUN_MAX_ANSWERS:
        raise DryRunAbandoned(f"more than {DRY_RUN_MAX_ANSWERS} data-dependent checks on meta tensors")
    if time.monotonic() > _budget.deadline:
        raise DryRunAbandoned(f"the dry forward ran past {DRY_RUN_MAX_S} s")


def _meta_answers(attr: str) -> Callable[..., object]:
    # Data-dependent checks (mask shortcuts, ``if x.any()``) cannot be answered on meta; any
    # answer will do, since only the order of module calls is recorded.
    answer: object = False if attr == "__bool__" else (0 if attr == "item" else [])

    def f(orig: Callable[..., object], tensor: torch.Tensor, *a: object, **k: object) -> object:
        if not tensor.is_meta:
            return orig(tensor, *a, **k)
        _spend()
        return answer

    return f


_DRY_RUN = ScopedPatch("dry-run", lambda: [(torch.Tensor, n) for n in ("item", "__bool__", "tolist")], _meta_answers)


def execution_order(
    model: nn.Module, spec: ModelSpec, planned: list[str]
) -> tuple[list[str], str, list[str]]:
    """Planned module names in the order a dry forward on ``meta`` first calls them.

    Falls back to registration order when the forward cannot run on meta tensors, or does not
    finish within the dry run's budget.
    """
    modules = dict(model.named_modules())
    seen: dict[str, None] = {}
    handles = []
    for name in planned:
        mod = modules.get(name)
        if mod is None:
            continue

        def hook(_m: nn.Module, _a: object, name: str = name) -> None:
            _spend()
            seen.setdefault(name, None)

        handles.append(mod.register_forward_pre_hook(hook))
    # Buffers are real; the dry run needs every tensor on meta, so swap them for the call.
    saved = [(m, dict(m._buffers)) for m in model.modules() if m._buffers]
    _budget.answers = 0
    _budget.deadline = time.monotonic() + DRY_RUN_MAX_S
    try:
        for m, bufs in saved:
            for k, b in bufs.items():
                if b is not None:
                    m._buffers[k] = b.to("meta")
        with _DRY_RUN.active(), torch.no_grad():
            model(**spec.dummy_inputs(device="meta"))
        source = "dry-forward"
    except Exception as e:  # any failure of a meta forward just means: no order from it
        log.info("dry forward on meta failed (%s: %s); using registration order", type(e).__name__, e)
        seen.clear()
        source = "registration"
    finally:
        for h in handles:
            h.remove()
        for m, bufs in saved:
            m._buffers.update(bufs)
    uncalled = [n for n in planned if n not in seen]
    # Without a dry run every module keeps its own gate; "uncalled" means seen not to run.
    return list(seen) + uncalled, source, uncalled if seen else []


def shard_groups(
    model: nn.Module, index: SkeletonIndex, tensors: Mapping[str, TensorEntry], order: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """(module, checkpoint names) per shard: each tensor goes to the first module in ``order``
    that holds it (a tied tensor to its first user); tensors held by no planned module last."""
    taken: set[str] = set()
    groups: list[tuple[str, list[str]]] = []
    for mname in order:
        names = [t for t in index.module_slots.get(mname, []) if t not in taken]
        if names:
            taken.update(names)
            groups.append((mname, sorted(names, key=lambda t: (tensors[t].file, tensors[t].start))))
    rest = sorted(set(index.slots) - taken)
    if rest:
        groups.append(("", rest))
    return groups


def planned_modules(model: nn.Module, index: SkeletonIndex) -> list[str]:
    """Modules that own checkpoint tensors, in registration order."""
    return [n for n, _ in model.named_modules() if index.module_slots.get(n)]


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
    """Shards in execution order and the reads that fetch them (``cicada plan``)."""
    planned = planned_modules(model, index)
    uncalled: list[str] = []
    if order is None:
        order, source, uncalled = execution_order(model, spec, planned)
    else:
        source = "given"
    groups = shard_groups(model, index, tensors, order)
    if groups and groups[-1][0] == "":
        uncalled.append("")
    return make_plan(groups, (), tensors, file_sizes, read_bytes=read_bytes, alignment=alignment,
                     modules=order, source=source, uncalled=uncalled)


def make_plan(
    groups: Sequence[tuple[str, Sequence[str]]],
    prefix: Sequence[ReadRange],
    tensors: Mapping[str, TensorEntry],
    file_sizes: Mapping[str, int],
    *,
    read_bytes: int,
    alignment: int,
    modules: Sequence[str],
    source: str,
    uncalled: Sequence[str],
    shard_order: Sequence[int] | None = None,
) -> Plan:
    """A plan for shards ``groups`` (index = position) whose first reads are ``prefix``.

    ``prefix`` holds reads already issued (their byte ranges are kept; which shards they serve
    is recomputed). New reads cover only bytes the prefix does not, for shards in
    ``shard_order`` (default: as given). A shard depends on every read overlapping its tensors.
    """
    prefix_ranges = [(r.file, r.start, r.end) for r in prefix]
    covered: dict[str, list[tuple[int, int]]] = {}
    for f, lo, hi in prefix_ranges:
        covered.setdefault(f, []).append((lo, hi))
    for spans in covered.values():
        spans.sort()
    order = list(shard_order) if shard_order is not None else list(range(len(groups)))
    uncovered: list[tuple[int, list[tuple[str, int, int]]]] = []
    for i in order:
        parts: list[tuple[str, int, int]] = []
        for t in groups[i][1]:
            e = tensors[t]
            parts += [(e.file, lo, hi) for lo, hi in _subtract(e.start, e.end, covered.get(e.file, []))]
        uncovered.append((i, parts))
    new = _coalesce(uncovered, file_sizes, read_bytes=read_bytes, alignment=alignment)
    # A shard depends on the prefix reads that hold some of its bytes and on the new reads
    # made for it; another window's read that touches its bytes only through alignment
    # rounding is not a dependency (those bytes arrive with the shard's own reads too).
    by_file: dict[str, list[tuple[int, int, int]]] = {}
    for i, (_, names) in enumerate(groups):
        for t in names:
            e = tensors[t]
            by_file.setdefault(e.file, []).append((e.start, e.end, i))
    for lst in by_file.values():
        lst.sort()
    reads: list[ReadRange] = []
    shard_reads: dict[int, list[int]] = {}
    for r, (f, lo, hi) in enumerate(prefix_ranges):
        served = sorted({i for _, _, i in _overlapping(by_file.get(f, []), lo, hi)})
        for i in served:
            shard_reads.setdefault(i, []).append(r)
        reads.append(ReadRange(f, lo, hi, tuple(served)))
    for f, lo, hi, served_set in new:
        served = sorted(served_set)
        for i in served:
            shard_reads.setdefault(i, []).append(len(reads))
        reads.append(ReadRange(f, lo, hi, tuple(served)))
    shards = tuple(
        Shard(i, m, tuple(names), tuple(shard_reads.get(i, ())), sum(tensors[t].nbytes for t in names))
        for i, (m, names) in enumerate(groups)
    )
    return Plan(tuple(modules), shards, tuple(reads), source, tuple(uncalled))


def _subtract(lo: int, hi: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) minus the sorted spans."""
    out = []
    pos = lo
    for a, b in spans:
        if b <= pos:
            continue
        if a >= hi:
            break
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
        if pos >= hi:
            break
    if pos < hi:
        out.append((pos, hi))
    return out


def _overlapping(spans: list[tuple[int, int, int]], lo: int, hi: int) -> list[tuple[int, int, int]]:
    import bisect

    # spans sorted by start and non-overlapping (tensors tile the file): scan from the one
    # that starts before lo.
    k = max(0, bisect.bisect_right(spans, (lo, float("inf"), 0)) - 1)
    out = []
    while k < len(spans) and spans[k][0] < hi:
        if spans[k][1] > lo:
            out.append(spans[k])
        k += 1
    return out


def _coalesce(
    shards: list[tuple[int, list[tuple[str, int, int]]]],
    file_sizes: Mapping[str, int],
    *,
    read_bytes: int,
    alignment: int,
) -> list[tuple[str, int, int, set[int]]]:
    """Reads for shards in order: consecutive shards are grouped into windows of about
    ``read_bytes``; within a window byte ranges are merged (small gaps included) and split into
    aligned pieces, so a layer's small tensors cost one request and a large tensor several."""
    out: list[tuple[str, int, int, set[int]]] = []
    step = max(alignment, read_bytes - read_bytes % alignment)
    window: list[tuple[int, list[tuple[str, int, int]]]] = []
    window_bytes = 0

    def flush() -> None:
        nonlocal window_bytes
        rank: dict[tuple[str, int, int], int] = {}
        owner: dict[tuple[str, int, int], int] = {}
        for w, (shard, parts) in enumerate(window):
            for p in parts:
                rank.setdefault(p, w)
                owner.setdefault(p, shard)
        merged: list[list[Any]] = []  # [file, start, end, first window rank]
        for f, a, b in sorted(rank):
            if merged and merged[-1][0] == f and a - merged[-1][2] <= MAX_GAP_BYTES:
                merged[-1][2] = max(merged[-1][2], b)
                merged[-1][3] = min(merged[-1][3], rank[(f, a, b)])
            else:
                merged.append([f, a, b, rank[(f, a, b)]])
        pieces = []
        for f, a, b, first in merged:
            a -= a % alignment
            b = min(file_sizes[f], -(-b // alignment) * alignment)
            lo = a
            while lo < b:
                hi = min(b, lo + step)
                if b - hi < step // 4:  # no runt piece at the end
                    hi = b
                served = {owner[p] for p in owner if p[0] == f and p[1] < hi and p[2] > lo}
                pieces.append((first, f, lo, hi, served))
                lo = hi
        # Within a window, what the earliest shard needs goes first.
        out.extend((f, lo, hi, served) for _, f, lo, hi, served in sorted(pieces, key=lambda p: p[:4]))
        window.clear()
        window_bytes = 0

    for i, parts in shards:
        nbytes = sum(b - a for _, a, b in parts)
        if not parts:
            continue
        if window and window_bytes + nbytes > read_bytes:
            flush()
        window.append((i, parts))
        window_bytes += nbytes
    if window:
        flush()
    return out


def first_reads(
    headers: Mapping[str, FileHeader], modules: Sequence[str] | None, *, read_bytes: int, alignment: int,
) -> list[ReadRange]:
    """Reads before the skeleton exists: in the module order of a stored plan (``modules``),
    else in file order. gpt2's 154 MB embedding, which its first layer needs, is last in its
    file: file order would put every other layer on the wire before it."""
    if not modules:
        return file_order_reads(headers, read_bytes=read_bytes, alignment=alignment)
    return hinted_reads(all_tensors(headers), {k: h.size for k, h in headers.items()}, modules,
                        read_bytes=read_bytes, alignment=alignment)


def hinted_reads(
    tensors: Mapping[str, TensorEntry], file_sizes: Mapping[str, int], modules: Sequence[str],
    *, read_bytes: int, alignment: int,
) -> list[ReadRange]:
    """Reads in the module order a stored plan recorded.

    A tensor goes with the innermost planned module its checkpoint name starts with; names
    that match none (a checkpoint saved under legacy names) are read last, in file order. Only
    a guess until the plan is checked against the skeleton: a wrong one costs speed, not bytes
    (the real plan keeps these reads and fetches whatever they missed).
    """
    rank = {m: i for i, m in enumerate(modules)}
    groups: list[list[str]] = [[] for _ in range(len(modules) + 1)]
    for name in sorted(tensors, key=lambda n: (tensors[n].file, tensors[n].start)):
        owner = name.rpartition(".")[0]
        while owner and owner not in rank:
            owner = owner.rpartition(".")[0]
        groups[rank.get(owner, len(modules))].append(name)
    parts = [(i, [(tensors[t].file, tensors[t].start, tensors[t].end) for t in names])
             for i, names in enumerate(groups) if names]
    return [ReadRange(f, lo, hi, ()) for f, lo, hi, _ in
            _coalesce(parts, file_sizes, read_bytes=read_bytes, alignment=alignment)]


def file_order_reads(
    headers: Mapping[str, Any], *, read_bytes: int, alignment: int
) -> list[ReadRange]:
    """Every file's tensor data in file order, before anything is known of the model."""
    step = max(alignment, read_bytes - read_bytes % alignment)
    reads = []
    for key in sorted(headers):
        h = headers[key]
        lo = h.data_offset - h.data_offset % alignment
        while lo < h.size:
            hi = min(h.size, lo + step)
            if h.size - hi < step // 4:
                hi = h.size
            reads.append(ReadRange(key, lo, hi, ()))
            lo = hi
    return reads


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
