"""One cold start, stage by stage: spec, headers, fetch, skeleton, plan, dry run, forward, verify.

``ColdStart.run`` reads top to bottom in the order the work starts. The event loop runs the
fetch; the executor thread builds the skeleton, plans, applies landed shards and computes.
Fetching starts as soon as the safetensors headers are known, in file order, while the
skeleton is built; the plan then re-orders the reads not yet admitted, first by registration
order and then by the execution order the dry forward finds (or at once, from a cached plan).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from protocols.errors import CicadaError, InferenceError, LoadError
from protocols.manifest import FileHeader, Plan
from protocols.serving import Priority
from protocols.storage import StorageBackend

from cicada_async.engine.capabilities import Capabilities
from cicada_async.engine.executor import Executor
from cicada_async.engine.fetch import Fetcher, FetchScheduler, FetchSettings, LoadPriority
from cicada_async.engine.forward import run_forward
from cicada_async.engine.headers import all_tensors, read_header
from cicada_async.engine.job import LoadJob, LoadOptions
from cicada_async.engine.landing import Landing
from cicada_async.engine.ledger import ShardLedger
from cicada_async.engine.manifest import verify_files
from cicada_async.engine.modeldir import ModelSpec, read_model_spec
from cicada_async.engine.plan import (
    build_plan,
    execution_order,
    first_reads,
    make_plan,
    planned_modules,
    shard_groups,
)
from cicada_async.engine.plancache import order_fits
from cicada_async.engine.resident import choose, resident_load
from cicada_async.engine.skeleton import SkeletonIndex, build_skeleton, index_skeleton, place_buffers
from cicada_async.engine.staging import landing_for
from cicada_async.engine.timeline import Timeline

log = logging.getLogger(__name__)

PREFETCH_READ_BYTES = 32 << 20

Outputs = dict[str, torch.Tensor] | BaseException | None


@dataclass
class LoadRequest:
    """What one cold start is asked to do, beyond where the weights are."""

    options: LoadOptions = field(default_factory=LoadOptions)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    inputs: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]] | None = None
    """With inputs, the gated forward computes while the model loads. A callable is asked for
    them on the loop when that forward starts: a batch gathered as late as possible."""
    priority: LoadPriority = field(default_factory=LoadPriority)
    """The load's priority, read again for every read and stage (the instance may raise it)."""
    cached_plan: Plan | None = None
    """A known execution order: no dry forward (if it fits the skeleton)."""
    plan_lookup: Callable[[ModelSpec, dict[str, FileHeader]], Awaitable[Plan | None]] | None = None
    """Without cached_plan: asked for a stored order once the headers are known (plancache)."""
    skeleton: Callable[[ModelSpec], nn.Module | None] | None = None
    """A meta skeleton built ahead for this spec, or None to build one (executor thread)."""
    on_prepared: Callable[[LoadJob], None] | None = None
    """Called once the gates are in: from then on other forwards may join the load."""
    shard_order: Callable[[list[int]], list[int]] | None = None
    """For tests: hold every landed shard, then apply them in this permuted order."""


async def cold_start(
    backend: StorageBackend,
    executor: Executor,
    scheduler: FetchScheduler,
    request: LoadRequest | None = None,
    *,
    timeline: Timeline | None = None,
    capabilities: Capabilities | None = None,
) -> tuple[nn.Module, Outputs, LoadJob]:
    """Load a model through the pipeline; see ``ColdStart.run``.

    ``capabilities``: what the opener found ``backend`` can do (asked here when not given).
    """
    caps = capabilities or Capabilities.of(backend)
    return await ColdStart(backend, caps, executor, scheduler, request or LoadRequest(), timeline or Timeline()).run()


class ColdStart:
    def __init__(self, backend: StorageBackend, capabilities: Capabilities, executor: Executor,
                 scheduler: FetchScheduler, request: LoadRequest, timeline: Timeline) -> None:
        self.backend = backend
        self.capabilities = capabilities
        self.executor = executor
        self.scheduler = scheduler
        self.request = request
        self.options = request.options
        self.timeline = timeline
        self.alignment = capabilities.alignment
        self.job: LoadJob | None = None
        # Every shard's state and the load's one failure path, from before any read is admitted.
        self.ledger = ShardLedger(executor, asyncio.get_running_loop())
        self._known_plan: asyncio.Future[Plan | None] | None = None

    async def run(self) -> tuple[nn.Module, Outputs, LoadJob]:
        """Returns the loaded model, the gated forward's outputs and the job.

        The outputs are None without inputs, and the exception when only that forward failed
        (bad inputs: the load itself is fine). On a load failure nothing half-loaded is kept
        and the load's own error is raised.
        """
        spec = await self.read_spec()
        skeleton = asyncio.ensure_future(self.executor.run(lambda: self.build_skeleton(spec), priority=self._priority()))
        try:
            hdrs = await self.read_headers(spec)
            landing = await self.open_landing(hdrs)
        except BaseException:
            skeleton.cancel()
            raise
        if self.options.resident and self.request.shard_order is None and await choose(landing, self.timeline):
            return await resident_load(self, spec, skeleton, hdrs, landing)  # files in memory
        if spec.manifest is not None:
            landing.hold_releases()  # converted spans stay resident until the files verify
        fetcher = await self.start_fetch(hdrs, landing)
        outputs: Outputs = None
        try:
            async with asyncio.TaskGroup() as tg:
                fetching = tg.create_task(self._fetch_or_fail(fetcher))
                model = await skeleton
                job = await self.plan(spec, model, hdrs, landing, fetcher)
                if self.request.cached_plan is None:
                    await self.dry_run(job, fetcher)
                job.install_gates()
                if self.request.on_prepared is not None:
                    self.request.on_prepared(job)
                inputs = self.request.inputs
                if inputs is not None:
                    outputs = await self.gated_forward(job, inputs() if callable(inputs) else inputs)
                await fetching
                if self.ledger.error is not None:
                    # The load failed while its fetch ran (an apply): the fetch stopped short,
                    # so the files are incomplete; report the failure, not their digests.
                    raise self.ledger.error
                await self.verify(spec, landing, hdrs)
                await self.executor.run(job.wait_all, priority=self._priority())
        except* CicadaError as eg:
            self.ledger.fail(eg.exceptions[0])
            raise eg.exceptions[0] from None
        except* BaseException as eg:
            err = first_leaf(eg)
            self.ledger.fail(err if isinstance(err, Exception) else LoadError("load cancelled"))
            if isinstance(err, Exception):
                # The real cause, not "unhandled errors in a TaskGroup".
                raise LoadError(f"{type(err).__name__}: {err}") from err
            raise
        finally:
            if not skeleton.done():
                skeleton.cancel()
            await landing.aclose()
            self.ledger.close()
        # Gates come off on the executor thread, between forwards, and only after a successful
        # load: after a failure they stay, so a forward that joined the load meets the load's
        # error at its first gate instead of computing on a half-loaded model.
        await self.executor.run(job.remove_gates, priority=self._priority())
        return model, outputs, job

    # stages, in the order they start ---------------------------------------------------------
    async def read_spec(self) -> ModelSpec:
        with self.timeline.stage("spec"):
            return await read_model_spec(self.backend)

    def build_skeleton(self, spec: ModelSpec) -> nn.Module:  # executor thread
        if self.request.skeleton is not None and (ready := self.request.skeleton(spec)) is not None:
            return ready
        with self.timeline.stage("skeleton"):
            return build_skeleton(spec, self.options.dtype)

    async def read_headers(self, spec: ModelSpec) -> dict[str, FileHeader]:
        with self.timeline.stage("headers"):
            hdrs = await read_headers(self.backend, spec)
        if self.request.plan_lookup is not None and self.request.cached_plan is None:
            # Looked up while the skeleton builds; plan() waits for the answer.
            self._known_plan = asyncio.ensure_future(self.request.plan_lookup(spec, hdrs))
        return hdrs

    async def open_landing(self, hdrs: dict[str, FileHeader]) -> Landing:
        o = self.options
        loop = asyncio.get_running_loop()

        def make() -> Landing:
            return landing_for(
                hdrs, o.device, read_bytes=o.read_bytes, alignment=self.alignment,
                pool_bytes=self.request.fetch.queue_bytes, post=self.ledger.post, staging=o.staging,
                mapped_backend=self.capabilities.mappable if o.mapped else None,
                loop=loop, converting=o.dtype is not None,
            )

        if o.staging or o.device.type != "cpu":
            return await asyncio.to_thread(make)  # pinned slabs and device buffers: off the loop
        return make()

    async def start_fetch(self, hdrs: dict[str, FileHeader], landing: Landing) -> Fetcher:
        """Reads in a stored plan's order (else file order); the plan re-orders the rest."""
        # Before the plan exists, read in larger pieces (4 read sizes, at most 32 MiB): the
        # skeleton build (and, in a fresh process, the transformers import) holds the GIL, and
        # each read costs the loop a GIL hand-over of up to 5 ms. Staging slabs fix the size.
        read_bytes = self.options.read_bytes
        if landing.slab_bytes is None:
            read_bytes = max(read_bytes, min(4 * read_bytes, PREFETCH_READ_BYTES))
        known = self.request.cached_plan
        if known is None and self._known_plan is not None and (
                self._known_plan.done() or self.capabilities.root is not None):
            # A local model's look-up reads small local files: worth its order from the first
            # read. A remote one asks the model's storage first (stat + GET, one or two round
            # trips): the first reads go out in file order meanwhile, and plan() applies the
            # stored order when it comes (review-3 C-15).
            known = await self._known_plan
        reads = tuple(first_reads(hdrs, known.modules if known else None, read_bytes=read_bytes,
                                  alignment=self.alignment))
        return Fetcher(Plan((), (), reads, "file", ()), self.backend, hdrs, landing,
                       settings=self.request.fetch, scheduler=self.scheduler,
                       priority=self.request.priority, ledger=self.ledger, timeline=self.timeline)

    async def plan(self, spec: ModelSpec, model: nn.Module, hdrs: dict[str, FileHeader],
                   landing: Landing, fetcher: Fetcher) -> LoadJob:
        """Index the skeleton, group tensors into per-module shards and re-order the fetch."""
        tensors = all_tensors(hdrs)
        cached = self.request.cached_plan or (await self._known_plan if self._known_plan else None)

        def planning() -> tuple[SkeletonIndex, list[tuple[str, list[str]]], list[str], Plan | None]:
            with self.timeline.stage("plan"):
                index = index_skeleton(model, tensors, renamer=lambda: spec.checkpoint_renamer(model))
                place_buffers(model, index, self.options.device)
                planned = planned_modules(model, index)
                known = cached if cached is not None and order_fits(cached, planned) else None
                modules = list(known.modules) if known is not None else planned
                return index, shard_groups(model, index, tensors, modules), modules, known

        index, self._groups, modules, cached = await self.executor.run(planning, priority=self._priority())
        self.request = replace(self.request, cached_plan=cached)  # run() dry-runs when None
        self._tensors = tensors
        self._file_sizes = {k: h.size for k, h in hdrs.items()}
        if cached is not None:
            plan = self._plan_for(fetcher, modules, cached.order_source, list(cached.uncalled))
        else:
            plan = self._plan_for(fetcher, modules, "registration", [])
        self.job = LoadJob(spec, model, index, plan, tensors, landing, self.options, self.executor,
                           self.timeline, self.ledger)
        self.ledger.plan(len(plan.shards), self.job.apply, self.request.shard_order)
        await fetcher.replan(plan, final=cached is not None)
        return self.job

    async def dry_run(self, job: LoadJob, fetcher: Fetcher) -> None:
        """Find the execution order on the executor while the first reads are on the wire."""
        modules = list(job.plan.modules)

        def order() -> tuple[list[str], str, list[str]]:
            with self.timeline.stage("dry-run"):
                return execution_order(job.model, job.spec, modules)

        exec_modules, source, uncalled = await self.executor.run(order, priority=self._priority())
        if self._groups and self._groups[-1][0] == "":
            uncalled = [*uncalled, ""]
        plan = self._plan_for(fetcher, exec_modules, source, uncalled)
        job.set_plan(plan)
        await fetcher.replan(plan, final=True)

    async def gated_forward(self, job: LoadJob, inputs: dict[str, torch.Tensor]) -> Outputs:
        def forward() -> dict[str, torch.Tensor]:
            wide = self.options.every_core_when_idle and self.options.device.type == "cpu"
            with self.timeline.stage("forward"), job.computing(), job.widening(self.scheduler if wide else None):
                return run_forward(job.model, inputs, self.options.device)

        try:
            out = await self.executor.run(forward, priority=self._priority())
            if not any(t.is_meta for t in out.values()):
                return out
        except InferenceError:
            if job.error is not None:
                raise job.error from None
        # The forward failed, or computed on meta: either the inputs are bad, or the model read
        # a parameter before its layer ran (``self.device`` in a forward) and met a meta
        # placeholder. With every weight applied, a plain forward tells which.
        await self.executor.run(job.wait_all, priority=self._priority())
        try:
            out = await self.executor.run(forward, priority=self._priority())
        except InferenceError as e:
            return e  # this request's inputs were bad; the load goes on
        if any(t.is_meta for t in out.values()):
            raise LoadError("the forward returns meta tensors even with every weight loaded")
        log.info("the gated forward read weights before their layer; answered after the load")
        return out

    async def verify(self, spec: ModelSpec, landing: Landing, hdrs: dict[str, FileHeader]) -> None:
        """Every file against the manifest, before any answer: the first request's outputs are
        returned only after this, and forwards that joined the load wait for the load's end."""
        if spec.manifest is not None:
            with self.timeline.stage("verify"):
                # The fetch ended when the last read landed; a staging landing's copies may
                # still be queued on the executor: hash only after they ran.
                await landing.settled()
                if self.ledger.error is not None:
                    raise self.ledger.error  # a copy failed: the bytes are not the file's
                await verify_files(landing, hdrs, spec.manifest)
            landing.release_held()

    # plumbing --------------------------------------------------------------------------------
    def _priority(self) -> Priority:
        """The load's stages run at its current priority (its most urgent waiting request's)."""
        return self.request.priority.current

    def _plan_for(self, fetcher: Fetcher, modules: list[str], source: str, uncalled: list[str]) -> Plan:
        groups = self._groups
        pos = {m: i for i, m in enumerate(modules)}
        order = sorted(range(len(groups)), key=lambda i: (pos.get(groups[i][0], len(pos)), i))
        return make_plan(
            groups, fetcher.plan.reads[: fetcher.admitted], self._tensors, self._file_sizes,
            read_bytes=self.options.read_bytes, alignment=self.alignment, modules=modules,
            source=source, uncalled=uncalled, shard_order=order,
        )

    async def _fetch_or_fail(self, fetcher: Fetcher) -> None:
        try:
            with self.timeline.stage("fetch"):
                await fetcher.run()
        except BaseException as e:
            # Wake a forward blocked in a gate: it must fail with this error, not hang.
            self.ledger.fail(e if isinstance(e, Exception) else LoadError("load cancelled"))
            raise


async def read_headers(backend: StorageBackend, spec: ModelSpec) -> dict[str, FileHeader]:
    hs = await asyncio.gather(*(read_header(backend, k) for k in spec.weight_files))
    return {h.key: h for h in hs}


async def prepare(
    backend: StorageBackend,
    executor: Executor,
    options: LoadOptions,
    timeline: Timeline,
    *,
    alignment: int,
    cached_plan: Plan | None = None,
    dry_run: bool = True,
) -> tuple[ModelSpec, nn.Module, SkeletonIndex, Plan, dict[str, FileHeader]]:
    """Spec, skeleton, index and plan without fetching (``cicada plan``).

    With ``dry_run=False`` the plan follows registration order (or ``cached_plan``'s order).
    """
    with timeline.stage("spec"):
        spec = await read_model_spec(backend)

    async def headers() -> dict[str, FileHeader]:
        with timeline.stage("headers"):
            return await read_headers(backend, spec)

    def skeleton() -> nn.Module:
        with timeline.stage("skeleton"):
            return build_skeleton(spec, options.dtype)

    hdrs, model = await asyncio.gather(headers(), executor.run(skeleton, priority=Priority.SETUP))
    tensors = all_tensors(hdrs)

    def planning() -> tuple[SkeletonIndex, Plan]:
        with timeline.stage("plan"):
            index = index_skeleton(model, tensors, renamer=lambda: spec.checkpoint_renamer(model))
            order = list(cached_plan.modules) if cached_plan is not None else None
            if order is None and not dry_run:
                order = [n for n, _ in model.named_modules() if index.module_slots.get(n)]
            plan = build_plan(
                model, spec, index, tensors, {k: h.size for k, h in hdrs.items()},
                read_bytes=options.read_bytes, alignment=alignment, order=order,
            )
            if cached_plan is not None:
                plan = replace(plan, order_source=cached_plan.order_source, uncalled=cached_plan.uncalled)
            elif not dry_run:
                plan = replace(plan, order_source="registration", uncalled=())
            return index, plan

    index, plan = await executor.run(planning, priority=Priority.SETUP)
    return spec, model, index, plan, hdrs


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
