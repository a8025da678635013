"""The resident path: a load whose weight files are already in the page cache (issue 28).

When every byte is in memory already, overlapping reads with compute gains nothing, and the
pipeline's machinery (read slots, populate calls, a ledger posting one apply per shard, a gate
before every layer) is pure overhead next to the stock ``meta`` + mmap load. This path loads as
that loader does: the files are mapped (the pipeline's own ``MappedLanding``, so every tensor
is the same view of the same bytes, converted the same way), every tensor is put into the
skeleton in one pass on the executor, and the forward runs without gates.

The choice is made per load, from measurement: ``mincore`` over the mapped files, before any
byte is read. Where the kernel does not show the page cache of a file (``mincore`` sees only
this process's own pages of a file it neither owns nor may write) the files read as not
resident and the pipeline runs, which is right for them either way. The timeline says which
path ran: a ``residency`` stage in both (the check; its span's ``nbytes`` = resident bytes), a
``resident`` stage on this path, ``fetch`` spans on the pipelined one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import mmap
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch import nn

from protocols.errors import CicadaError, InferenceError, LoadError
from protocols.manifest import FileHeader, Plan

from cicada_async.engine.executor import PIECE_S, Executor, yield_point
from cicada_async.engine.fetch import FetchScheduler, LoadPriority
from cicada_async.engine.forward import run_forward
from cicada_async.engine.headers import all_tensors
from cicada_async.engine.job import LoadJob, LoadOptions
from cicada_async.engine.ledger import ShardLedger
from cicada_async.engine.landing import Landing, MappedLanding
from cicada_async.engine.modeldir import ModelSpec
from cicada_async.engine.plan import execution_order, make_plan, planned_modules, shard_groups
from cicada_async.engine.plancache import order_fits
from cicada_async.engine.skeleton import index_skeleton, place_buffers
from cicada_async.engine.timeline import Timeline

log = logging.getLogger(__name__)

Outputs = dict[str, torch.Tensor] | BaseException | None  # as pipeline.Outputs


class Request(Protocol):
    """What this path reads of ``pipeline.LoadRequest`` (a protocol: no import circle)."""

    @property
    def priority(self) -> LoadPriority: ...
    @property
    def cached_plan(self) -> Plan | None: ...
    @property
    def inputs(self) -> dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]] | None: ...
    @property
    def on_prepared(self) -> Callable[[LoadJob], None] | None: ...


class ColdStart(Protocol):
    """What this path uses of ``pipeline.ColdStart``: its parts, its plan look-up, its verify."""

    @property
    def request(self) -> Request: ...
    @property
    def executor(self) -> Executor: ...
    @property
    def scheduler(self) -> FetchScheduler: ...
    @property
    def options(self) -> LoadOptions: ...
    @property
    def timeline(self) -> Timeline: ...
    @property
    def ledger(self) -> ShardLedger: ...
    @property
    def alignment(self) -> int: ...
    @property
    def _known_plan(self) -> asyncio.Future[Plan | None] | None: ...
    async def verify(self, spec: ModelSpec, landing: Landing, hdrs: dict[str, FileHeader]) -> None: ...

# Resident pages needed, as a fraction of the files' pages. A missing page faults in from disk
# during the forward (the kernel reads around it), so a few are cheap; many are a slow,
# un-overlapped read that the pipeline would have hidden behind compute.
RESIDENT_FRACTION = 0.98

_libc: ctypes.CDLL | None = None


def _mincore() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.mincore.restype = ctypes.c_int
    return _libc.mincore


def resident_bytes(maps: Iterable[mmap.mmap]) -> tuple[int, int]:
    """(resident, total) bytes of the mapped files in the page cache, by ``mincore``.

    Asking does not fault any page in. A failing call counts its file as not resident.
    """
    resident = total = 0
    page = mmap.PAGESIZE
    for m in maps:
        n = len(m)
        total += n
        if n == 0:
            continue
        vec = np.zeros((n + page - 1) // page, dtype=np.uint8)
        buf = ctypes.c_char.from_buffer(m)  # the mapping's address; released right after
        try:
            rc = _mincore()(ctypes.addressof(buf), n, vec.ctypes.data)
        finally:
            del buf
        if rc == 0:
            resident += min(n, int(np.count_nonzero(vec & 1)) * page)
    return resident, total


async def choose(landing: Landing, timeline: Timeline) -> bool:
    """True when this load should take the resident path: local files, mapped on the CPU
    (``MappedLanding``), at least ``RESIDENT_FRACTION`` of their bytes in the page cache."""
    if not isinstance(landing, MappedLanding):
        return False  # remote storage, arenas, or a device: the pipeline
    start = timeline.now()
    # On a thread: the kernel walks every page (24-29 ms of the loop for gpt2-medium's 1.4 GB,
    # measured as loop lag), and ctypes lets the GIL go meanwhile.
    have, total = await asyncio.to_thread(resident_bytes, list(landing.maps.values()))
    timeline.add("stage", "residency", start, nbytes=have)
    taken = total > 0 and have >= RESIDENT_FRACTION * total
    log.info('{"event": "load_path", "path": "%s", "resident_bytes": %d, "total_bytes": %d}',
             "resident" if taken else "pipelined", have, total)
    return taken


async def resident_load(cs: ColdStart, spec: ModelSpec, skeleton: asyncio.Future[nn.Module],
                        hdrs: dict[str, FileHeader], landing: Landing) -> tuple[nn.Module, Outputs, LoadJob]:
    """``ColdStart.run`` for resident files: the model, the first forward's outputs, the job."""
    priority = cs.request.priority
    try:
        model = await skeleton
        known = cs.request.cached_plan or (await cs._known_plan if cs._known_plan is not None else None)
        job = await cs.executor.run(_place, cs, spec, model, hdrs, landing, known, priority=priority.current)
        if cs.request.on_prepared is not None:
            cs.request.on_prepared(job)  # forwards that join now compute on the loaded model
        outputs: Outputs = None
        inputs = cs.request.inputs
        if inputs is not None:
            outputs = await cs.executor.run(_forward, cs, job, inputs() if callable(inputs) else inputs,
                                            priority=priority.current)
        await cs.verify(spec, landing, hdrs)  # with a manifest: before any answer
        return model, outputs, job
    except CicadaError:
        raise
    except Exception as e:
        raise LoadError(f"{type(e).__name__}: {e}") from e
    finally:
        if not skeleton.done():
            skeleton.cancel()
        await landing.aclose()
        cs.ledger.close()


def _place(cs: ColdStart, spec: ModelSpec, model: nn.Module, hdrs: dict[str, FileHeader],
           landing: Landing, known: Plan | None) -> LoadJob:  # executor thread
    """Index the skeleton, make the plan (kept for later loads), put every tensor in; waiting
    work of this priority or a more urgent one runs between the steps (issue 28 item 4)."""
    tl, opts = cs.timeline, cs.options
    turn = functools.partial(yield_point, PIECE_S)
    tensors = all_tensors(hdrs)
    with tl.stage("plan"):  # yield points between the steps, and after each shard's applies
        index = index_skeleton(model, tensors, renamer=lambda: spec.checkpoint_renamer(model))
        turn()
        place_buffers(model, index, opts.device)
        planned = planned_modules(model, index)
        turn()
        fits = known is not None and order_fits(known, planned)
        if known is not None and fits:
            modules, source, uncalled = list(known.modules), known.order_source, list(known.uncalled)
        else:
            # No stored order: the dry run on meta, as the pipeline's first load does, before
            # any weight is in; its order is stored for the loads that will read from disk.
            with tl.stage("dry-run"), _yielding(model, planned, turn):
                modules, source, uncalled = execution_order(model, spec, planned)
        turn()
        groups = shard_groups(model, index, tensors, modules)
        if not fits and groups and groups[-1][0] == "":
            uncalled = [*uncalled, ""]
        plan = make_plan(groups, (), tensors, {k: h.size for k, h in hdrs.items()}, read_bytes=opts.read_bytes,
                         alignment=cs.alignment, modules=modules, source=source, uncalled=uncalled)
    with tl.stage("resident"):
        job = LoadJob(spec, model, index, plan, tensors, landing, opts, cs.executor, tl, cs.ledger)
        job.apply_all()
        job.remove_gates()  # no gates were in: this leaves the warm forwards' yield points
    return job


@contextlib.contextmanager
def _yielding(model: nn.Module, names: list[str], turn: Callable[[], None]) -> Iterator[None]:
    """Yield points before each of ``names``' modules while inside (a dry run: a model's
    forward on meta, 1.2 s for a 192-layer GPT-2 in one turn otherwise, measured)."""
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda _m, _a: turn()) for n in names if n in modules]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _forward(cs: ColdStart, job: LoadJob, inputs: dict[str, torch.Tensor]) -> Outputs:  # executor thread
    """The plain forward, with the thread count every forward of the engine uses."""
    opts, tl = cs.options, cs.timeline
    wide = opts.every_core_when_idle and opts.device.type == "cpu"
    start = tl.now()
    try:
        with tl.stage("forward"), job.widening(cs.scheduler if wide else None):
            out = run_forward(job.model, inputs, opts.device)
    except InferenceError as e:
        return e  # this request's inputs were bad; the load itself is fine
    tl.add("compute", "<model>", start)
    return out
