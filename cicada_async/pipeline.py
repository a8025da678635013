"""One cold start: skeleton, plan, fetch, apply-as-landed and the layer-gated forward.

The event loop runs the fetch; the executor thread builds, plans, applies and computes.
A forward pre-hook on every planned module blocks (applying whatever lands meanwhile) until
that module's own shards are applied, so layer k computes while later layers are on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from protocols.errors import CheckpointError, CicadaError, InferenceError, LoadError
from protocols.manifest import FileHeader, Plan, TensorEntry
from protocols.storage import StorageBackend

from .landing import Landing, landing_for
from .decoupler import FetchScheduler, Fetcher, FetchSettings
from .executor import Executor
from .miniloader import SkeletonIndex, index_skeleton, materialize, skeleton_mode
from .modeldir import ModelSpec, output_dict, read_model_spec
from .plan import (
    DEFAULT_READ_BYTES,
    build_plan,
    execution_order,
    file_order_reads,
    make_plan,
    planned_modules,
    shard_groups,
)
from .safetensors_header import header_length, parse_header
from .timeline import Timeline

log = logging.getLogger(__name__)

HEADER_PROBE = 64 << 10
PREFETCH_READ_BYTES = 32 << 20  # one read usually gets the length prefix and the whole header


@dataclass
class LoadOptions:
    dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    read_bytes: int = DEFAULT_READ_BYTES
    load_timeout_s: float = 600.0
    # Use the staging path (pinned slabs, device-side assembly) even on the CPU: for tests of
    # the CUDA path on machines without a GPU.
    staging: bool = False
    # Local files: map them and let the kernel read into the page cache that tensors view
    # (no copy, no zeroing). False reads into anonymous arenas with O_DIRECT instead.
    mapped: bool = True


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


def build_skeleton(spec: ModelSpec, dtype: torch.dtype | None) -> nn.Module:
    with skeleton_mode(), torch.device("cpu"):
        model = spec.build()
    if dtype is not None:
        model.to(dtype)  # on meta this is bookkeeping; real float buffers follow as they would in eager
    return model.eval()


class LoadJob:
    """State shared by the fetch (loop thread) and the applies and forward (executor thread)."""

    def __init__(
        self,
        spec: ModelSpec,
        model: nn.Module,
        index: SkeletonIndex,
        plan: Plan,
        tensors: dict[str, TensorEntry],
        landing: Landing,
        options: LoadOptions,
        executor: Executor,
        timeline: Timeline,
        loop: asyncio.AbstractEventLoop,
        on_applied: Callable[[int], Any],
    ) -> None:
        self.spec = spec
        self.model = model
        self.index = index
        self.plan = plan
        self.tensors = tensors
        self.landing = landing
        self.events: dict[int, Any] = {}
        self.options = options
        self.executor = executor
        self.timeline = timeline
        self.loop = loop
        self.on_applied = on_applied
        self.applied = [False] * len(plan.shards)
        self.remaining = len(plan.shards)
        self.error: BaseException | None = None
        self.deadline = time.monotonic() + options.load_timeout_s
        self._hooks: list[Any] = []
        self.set_plan(plan)

    def set_plan(self, plan: Plan) -> None:
        """Adopt a re-planned (same shards, new order) plan before the gates go in."""
        self.plan = plan
        shard_of = {t: s.index for s in plan.shards for t in s.tensors}
        self.module_shards: dict[str, list[int]] = {
            m: sorted({shard_of[t] for t in names}) for m, names in self.index.module_slots.items()
        }
        self.uncalled_shards = sorted(
            {i for m in plan.uncalled for i in self.module_shards.get(m, [])}
            | {s.index for s in plan.shards if s.module == ""}
        )

    # loop thread -----------------------------------------------------------------------------
    def shard_landed(self, i: int) -> None:
        self.executor.post_apply(lambda: self._apply(i))

    def fail(self, exc: BaseException) -> None:
        self.executor.post_apply(lambda: self._fail(exc))

    # executor thread ---------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def _apply(self, i: int) -> None:
        if self.error is not None or self.applied[i]:
            return
        shard = self.plan.shards[i]
        start = self.timeline.now()
        try:
            for name in shard.tensors:
                value = self.landing.make_tensor(self.tensors[name], self.plan, i)
                materialize(self.index.slots[name], value)
            ev = self.landing.shard_done()
            if ev is not None:
                self.events[i] = ev
        except Exception as e:  # noqa: BLE001 - any apply failure fails the whole load
            self.error = LoadError(f"applying weights of {shard.module or 'the model'}: {e}")
            return
        self.timeline.add("apply", shard.module, start, nbytes=shard.nbytes)
        self.applied[i] = True
        self.remaining -= 1
        self.loop.call_soon_threadsafe(self.on_applied, i)

    def wait_for(self, shards: list[int], what: str) -> None:
        if all(self.applied[i] for i in shards) and self.error is None:
            self._device_wait(shards)
            return
        start = self.timeline.now()
        self.executor.wait_until(
            lambda: self.error is not None or all(self.applied[i] for i in shards), self.deadline
        )
        self.timeline.add("wait", what, start)
        if self.error is not None:
            raise self.error
        self._device_wait(shards)

    def _device_wait(self, shards: list[int]) -> None:
        # On CUDA the shard's copies may still be queued: compute waits on the device for its
        # own copies only, without blocking the host.
        if self.events:
            stream = torch.cuda.current_stream(self.options.device)
            for i in shards:
                ev = self.events.pop(i, None)
                if ev is not None:
                    stream.wait_event(ev)

    def wait_all(self) -> None:
        self.executor.wait_until(lambda: self.error is not None or self.remaining == 0, self.deadline)
        if self.error is not None:
            raise self.error

    def install_gates(self) -> None:
        modules = dict(self.model.named_modules())
        starts: dict[str, float] = {}

        def gate(name: str, shards: list[int]) -> Callable[..., None]:
            def pre(_m: nn.Module, _a: Any) -> None:
                self.wait_for(shards, name)
                starts[name] = self.timeline.now()

            return pre

        def done(name: str) -> Callable[..., None]:
            def post(_m: nn.Module, _a: Any, _o: Any) -> None:
                if name in starts:
                    self.timeline.add("compute", name, starts.pop(name))

            return post

        for name, shards in self.module_shards.items():
            mod = modules[name]
            self._hooks.append(mod.register_forward_pre_hook(gate(name, shards)))
            self._hooks.append(mod.register_forward_hook(done(name)))
        if self.uncalled_shards:
            # Weights of modules the dry run never called may be read by other code: the root
            # waits for them (they are fetched early enough only if the plan puts them early).
            self._hooks.append(
                self.model.register_forward_pre_hook(gate("<uncalled>", self.uncalled_shards))
            )

    def check(self) -> None:
        """Raise the load's error, if it failed (executor thread)."""
        self.executor.run_applies()
        if self.error is not None:
            raise self.error

    def remove_gates(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def run_forward(model: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A forward on the executor thread; outputs named and on the CPU."""
    try:
        with torch.inference_mode():
            if device.type != "cpu":
                inputs = {k: v.to(device) for k, v in inputs.items()}
            out = output_dict(model(**inputs))
            if device.type != "cpu":
                out = {k: v.cpu() for k, v in out.items()}
            return out
    except CicadaError:
        raise
    except Exception as e:  # noqa: BLE001 - any forward failure is the model's, not ours
        raise InferenceError(f"forward failed: {type(e).__name__}: {e}") from e


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
    """Spec, skeleton, index and plan; headers are read while the skeleton is built.

    With ``dry_run=False`` the plan follows registration order (or ``cached_plan``'s order) so
    that fetching can start at once; ``cold_start`` then runs the dry forward while the first
    reads are on the wire and re-plans what has not been admitted yet.
    """
    with timeline.stage("spec"):
        spec = await read_model_spec(backend)

    async def headers() -> dict[str, FileHeader]:
        with timeline.stage("headers"):
            hs = await asyncio.gather(*(read_header(backend, k) for k in spec.weight_files))
        return {h.key: h for h in hs}

    def skeleton() -> nn.Module:
        with timeline.stage("skeleton"):
            return build_skeleton(spec, options.dtype)

    hdrs, model = await asyncio.gather(headers(), executor.run(skeleton, priority=-1))
    tensors = all_tensors(hdrs)

    def planning() -> tuple[SkeletonIndex, Plan]:
        with timeline.stage("plan"):
            index = index_skeleton(model, tensors, spec.checkpoint_renamer(model))
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

    index, plan = await executor.run(planning, priority=-1)
    return spec, model, index, plan, hdrs


def all_tensors(hdrs: dict[str, FileHeader]) -> dict[str, TensorEntry]:
    tensors: dict[str, TensorEntry] = {}
    for h in hdrs.values():
        for name, e in h.tensors.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} and {e.file}")
            tensors[name] = e
    return tensors


async def cold_start(
    backend: StorageBackend,
    executor: Executor,
    scheduler: FetchScheduler,
    *,
    options: LoadOptions | None = None,
    fetch: FetchSettings | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
    priority: Callable[[], float] = lambda: 0.0,
    timeline: Timeline | None = None,
    cached_plan: Plan | None = None,
    on_prepared: Callable[["LoadJob"], None] | None = None,
    shard_order: Callable[[list[int]], list[int]] | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor] | BaseException | None, LoadJob]:
    """Load a model through the pipeline; with ``inputs``, compute while it loads.

    Fetching starts as soon as the safetensors headers are known, in file order, while the
    skeleton is built (which may first import transformers); the plan then re-orders the reads
    not yet admitted by the registration order, and the dry forward by execution order.

    Returns the loaded model, the outputs of the gated forward (None without inputs; the
    exception when only that forward failed, e.g. on bad inputs, since the load itself is fine)
    and the job (with the timeline and plan). On a load failure nothing half-loaded is kept and
    the error is raised. ``shard_order`` exists for tests: it permutes the order in which landed
    shards are applied.
    """
    options = options or LoadOptions()
    fetch = fetch or FetchSettings()
    timeline = timeline or Timeline()
    loop = asyncio.get_running_loop()
    alignment = max(getattr(backend, "alignment", 1), 1)
    with timeline.stage("spec"):
        spec = await read_model_spec(backend)

    def skeleton() -> nn.Module:
        with timeline.stage("skeleton"):
            return build_skeleton(spec, options.dtype)

    skeleton_fut = asyncio.ensure_future(executor.run(skeleton, priority=-1))
    try:
        with timeline.stage("headers"):
            hs = await asyncio.gather(*(read_header(backend, k) for k in spec.weight_files))
    except BaseException:
        skeleton_fut.cancel()
        raise
    hdrs = {h.key: h for h in hs}
    tensors = all_tensors(hdrs)
    file_sizes = {k: h.size for k, h in hdrs.items()}
    landing = landing_for(
        hdrs, options.device, options.dtype, read_bytes=options.read_bytes, alignment=alignment,
        pool_bytes=fetch.queue_bytes, post=executor.post_apply, staging=options.staging,
        mapped_backend=backend if options.mapped and hasattr(backend, "map_file") else None,
    )
    applied_q: asyncio.Queue[int] = asyncio.Queue()
    job: LoadJob | None = None
    held: list[int] = []

    def landed(i: int) -> None:
        assert job is not None  # shards exist only once the job does
        if shard_order is None:
            job.shard_landed(i)
            return
        held.append(i)
        if len(held) == len(job.plan.shards):
            for j in shard_order(list(held)):
                job.shard_landed(j)

    # Before the plan exists, read in larger pieces (4 read sizes, at most 32 MiB): the
    # skeleton build (and, in a fresh process, the transformers import) holds the GIL, and
    # each read costs the loop a GIL hand-over of up to 5 ms. Staging slabs fix the size.
    prefetch_bytes = options.read_bytes
    if not hasattr(landing, "slab_bytes"):
        prefetch_bytes = max(options.read_bytes, min(4 * options.read_bytes, PREFETCH_READ_BYTES))
    prefetch = Plan((), (), tuple(file_order_reads(hdrs, read_bytes=prefetch_bytes, alignment=alignment)),
                    "file", ())
    fetcher = Fetcher(prefetch, backend, hdrs, landing, settings=fetch, scheduler=scheduler,
                      priority=priority, on_landed=landed, timeline=timeline)

    def plan_for(groups: list[tuple[str, list[str]]], modules: list[str], source: str,
                 uncalled: list[str]) -> Plan:
        pos = {m: i for i, m in enumerate(modules)}
        order = sorted(range(len(groups)), key=lambda i: (pos.get(groups[i][0], len(pos)), i))
        return make_plan(
            groups, fetcher.plan.reads[: fetcher.admitted], tensors, file_sizes,
            read_bytes=options.read_bytes, alignment=alignment, modules=modules, source=source,
            uncalled=uncalled, shard_order=order,
        )

    async def release_budget() -> None:
        while True:
            await fetcher.shard_applied(await applied_q.get())

    outputs: dict[str, torch.Tensor] | BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            fetch_task = tg.create_task(_fetch_or_fail(fetcher, lambda: job, timeline))
            releaser = tg.create_task(release_budget())
            model = await skeleton_fut

            def planning() -> tuple[SkeletonIndex, list[tuple[str, list[str]]], list[str]]:
                with timeline.stage("plan"):
                    index = index_skeleton(model, tensors, spec.checkpoint_renamer(model))
                    modules = (list(cached_plan.modules) if cached_plan is not None
                               else planned_modules(model, index))
                    return index, shard_groups(model, index, tensors, modules), modules

            index, groups, modules = await executor.run(planning, priority=-1)
            if cached_plan is not None:
                plan = plan_for(groups, modules, cached_plan.order_source, list(cached_plan.uncalled))
            else:
                plan = plan_for(groups, modules, "registration", [])
            job = LoadJob(spec, model, index, plan, tensors, landing, options, executor, timeline,
                          loop, applied_q.put_nowait)
            await fetcher.replan(plan, final=cached_plan is not None)
            if cached_plan is None:
                # The dry forward runs on the executor while reads are on the wire (the
                # executor would idle until the first shard lands anyway).
                def order() -> tuple[list[str], str, list[str]]:
                    with timeline.stage("dry-run"):
                        return execution_order(model, spec, modules)

                exec_modules, source, uncalled = await executor.run(order, priority=-1)
                if groups and groups[-1][0] == "":
                    uncalled = [*uncalled, ""]
                plan = plan_for(groups, exec_modules, source, uncalled)
                job.set_plan(plan)
                await fetcher.replan(plan, final=True)
            job.install_gates()
            if on_prepared is not None:
                on_prepared(job)  # from here on, other forwards may join (the gates hold them)
            if inputs is not None:
                def gated() -> dict[str, torch.Tensor]:
                    with timeline.stage("forward"):
                        return run_forward(model, inputs, options.device)

                try:
                    outputs = await executor.run(gated, priority=priority())
                except InferenceError as e:
                    if job.error is not None:
                        raise job.error from None
                    outputs = e  # this request's inputs were bad; the load goes on
            await fetch_task
            if spec.manifest is not None:
                with timeline.stage("verify"):
                    await verify_files(landing, hdrs, spec.manifest)
            await executor.run(job.wait_all, priority=-1)
            releaser.cancel()
    except* CicadaError as eg:
        if job is not None:
            job.fail(eg.exceptions[0])
        raise eg.exceptions[0] from None
    except* BaseException as eg:
        err = eg.exceptions[0]
        if job is not None:
            job.fail(err if isinstance(err, Exception) else LoadError("load cancelled"))
        raise
    finally:
        if not skeleton_fut.done():
            skeleton_fut.cancel()
        await landing.aclose()
    # Gates come off on the executor thread, between forwards, and only after a successful
    # load: after a failure they stay, so a forward that joined the load meets the load's
    # error at its first gate instead of computing on a half-loaded model.
    await executor.run(job.remove_gates, priority=-1)
    return model, outputs, job


async def verify_files(landing: Landing, hdrs: dict[str, FileHeader], manifest: dict[str, Any]) -> None:
    """Check every weight file against the manifest's sha256 (``cicada pack`` writes it)."""
    from .pack import verify

    files = getattr(landing, "file_bytes", None)
    if files is None:
        log.warning("this landing (%s) cannot verify checksums; skipped", type(landing).__name__)
        return
    # hashlib releases the GIL on large buffers: files hash in parallel with compute.
    await asyncio.gather(*(asyncio.to_thread(verify, k, files(k, h), manifest) for k, h in hdrs.items()))


async def _fetch_or_fail(fetcher: Fetcher, job: Callable[[], LoadJob | None], timeline: Timeline) -> None:
    try:
        with timeline.stage("fetch"):
            await fetcher.run()
    except BaseException as e:
        # Wake a forward blocked in a gate: it must fail with this error, not hang.
        j = job()
        if j is not None:
            j.fail(e if isinstance(e, Exception) else LoadError("load cancelled"))
        raise
