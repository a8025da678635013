"""One served model: the serverless lifecycle (unloaded, loading, ready) on top of the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol, TypeVar

import torch
from torch import nn

from backends import scheme_of
from protocols.errors import BadRequest, CicadaError, LoadError
from protocols.generation import GenerationDelta, GenerationStats, PromptCodec, SamplingParams
from protocols.manifest import Plan
from protocols.serving import Inputs, ModelOptions, ModelState, Priority, Tensors, TensorSpec
from protocols.storage import FileWatch, StorageBackend

from cicada_async.engine.capabilities import Capabilities, open_with_capabilities
from cicada_async.engine.executor import AHEAD_OF_REQUESTS, Executor
from cicada_async.engine.fetch import FetchSettings, LoadPriority
from cicada_async.engine.footprint import estimated_bytes, served_bytes
from cicada_async.engine.generate import GenerationLoop, is_causal_lm
from cicada_async.engine.forward import inputs_meta, io_spec, pad_token, run_forward
from cicada_async.engine.headers import read_header
from cicada_async.engine.job import LoadJob, load_options
from cicada_async.engine.modeldir import ModelSpec, read_model_spec
from cicada_async.engine.pipeline import LoadRequest, Outputs, first_leaf
from cicada_async.engine.plancache import PlanCache
from cicada_async.engine.ready import ReadySkeleton
from cicada_async.engine.rss import RssSampler
from cicada_async.engine.timeline import Timeline

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineParts(Protocol):
    """What a model instance uses of the engine that made it (``runtime.Engine``)."""

    @property
    def executor(self) -> Executor: ...
    @property
    def fetch(self) -> FetchSettings: ...
    @property
    def plans(self) -> PlanCache: ...
    @property
    def storage(self) -> Mapping[str, Mapping[str, object]]: ...
    @property
    def node_cache(self) -> Mapping[str, object]: ...
    @property
    def read_bytes(self) -> int: ...
    @property
    def load_timeout_s(self) -> float: ...
    @property
    def every_core_when_idle(self) -> bool: ...
    def no_load_running(self) -> bool:
        """True while no model of the engine loads (a warm forward may take every core)."""
        ...
    async def cold_start(self, backend: StorageBackend, capabilities: Capabilities, request: LoadRequest,
                         timeline: Timeline) -> tuple[nn.Module, Outputs, LoadJob]:
        """One load through the pipeline, on the engine's executor and fetch scheduler."""
        ...


class ModelInstance:
    """One servable model: unloaded -> loading -> ready, back to unloaded on unload or failure."""

    def __init__(self, engine: EngineParts, name: str, uri: str, options: ModelOptions) -> None:
        self.engine = engine
        self.name = name
        self.uri = uri
        self.options = options
        self.state: ModelState = "unloaded"
        self.nbytes: int | None = None
        # Served bytes, before any load (from the files' headers, in the serving dtype).
        self.weight_bytes: int | None = None
        self.device_bytes: dict[str, int] = {}  # the loaded model's bytes per device
        self._describing: asyncio.Future[ModelSpec] | None = None
        self.last_error: str | None = None
        self.last_timeline: Timeline | None = None
        self.last_used = time.monotonic()
        self.cold_starts = 0
        self._model: nn.Module | None = None
        self._load: asyncio.Task[None] | None = None
        self._job: asyncio.Future[LoadJob] | None = None
        self._plan: Plan | None = None  # reused by later loads of the same weights
        self._fetch_priority = LoadPriority()  # read by the load's fetch before every read
        self._io: tuple[list[TensorSpec], list[TensorSpec]] | None = None
        self._first_outputs: asyncio.Future[Tensors | None] | None = None
        self._load_error: BaseException | None = None
        self._inputs_meta: list[TensorSpec] = []
        self.pad_token_id: int | None = None  # set by describe(): padding of token batches allowed
        self._watches: list[FileWatch] = []  # mapped weight files the ready model's tensors view
        self._ready = ReadySkeleton(name)  # kept across unloads once prebuild() asked for it
        self.causal_lm = False  # known from the config (describe, or a load)
        self.generation = GenerationLoop(
            name, options, engine, lambda p: self.load(priority=p), lambda: self._model if self.state == "ready" else None,
            lambda: open_with_capabilities(uri, engine.storage.get(scheme_of(uri), {}), cache=engine.node_cache)[0],
            prepared=self._prepared_job)
        load_options(options, read_bytes=1, load_timeout_s=1)  # validate early

    # public API --------------------------------------------------------------------------------
    async def infer(self, inputs: Inputs, *, priority: Priority = AHEAD_OF_REQUESTS) -> Tensors:
        """One forward. ``inputs`` may be a callable, asked on the loop just before the forward
        starts (for a cold start: when the gated forward starts), so a batch forms late."""
        self.last_used = time.monotonic()
        try:
            if self.state == "ready" and self._model is not None and self._files_changed():
                await self.unload()  # the next lines cold-start it from the files as they are now
            if self.state == "ready" and self._model is not None:
                batch, engine = inputs() if callable(inputs) else inputs, self.engine
                every = engine.every_core_when_idle and engine.no_load_running()
                return await engine.executor.run(
                    run_forward, self._model, batch, torch.device(self.options.device), every, priority=priority)
            if self._load is None:
                # This request's inputs ride along with the load: it computes while loading.
                self._start_load(priority, inputs)
                first = self._first_outputs
                assert first is not None
                try:
                    out = await asyncio.shield(first)
                finally:
                    # Read once, by this request: the instance must not keep the first answer's
                    # tensors (outside any memory budget) until the next load. Cancelled before
                    # the load ended, the request is not there to read them: dropped when set.
                    if self._first_outputs is first:
                        if first.done():
                            self._first_outputs = None
                        else:
                            first.add_done_callback(self._drop_first)
                if out is not None:
                    return out
            assert self._job is not None
            load = self._load
            job = await asyncio.shield(self._job)
            joining = inputs() if callable(inputs) else inputs
            device = torch.device(self.options.device)

            def joined() -> Tensors:
                job.check()  # a failed load's model must not compute
                with job.computing():
                    return run_forward(job.model, joining, device)

            out = await self.engine.executor.run(joined, priority=priority)
            if job.spec.manifest is not None and load is not None:
                # Computed while the load went on: answered only once its bytes verified.
                await asyncio.wait({load})  # its outcome reaches us through job.check
                await self.engine.executor.run(job.check, priority=priority)
            return out
        finally:
            self.last_used = time.monotonic()

    async def load(self, *, priority: Priority = AHEAD_OF_REQUESTS) -> None:
        if self.state == "ready":
            return
        if self._load is None:
            self._start_load(priority, None)
        assert self._job is not None
        # The job future carries the load's error when it fails before or while planning;
        # after planning, the load task's own outcome does.
        await asyncio.shield(self._job)
        load = self._load
        if load is not None:
            await asyncio.shield(load)
        if not self._is_ready():  # the load ran meanwhile: ask again
            raise self._load_error or LoadError(f"loading {self.name} failed")

    async def unload(self) -> None:
        # Its sequences fail at once (never a hang), before the model goes.
        await self.generation.stop(LoadError(f"model {self.name} was unloaded"))
        load = self._load
        if load is not None and not load.done():
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError, CicadaError):
                await load
        # The last reference goes on the executor thread, after any forward in flight: freeing
        # the weights (munmap of GB arenas) must not stall the loop. The box is the only
        # reference left once _reset ran; clearing it there drops the model there.
        box = [self._model] if self._model is not None else []
        self._reset()
        if box and self.engine.executor.alive:
            await self.engine.executor.run(box.clear, priority=Priority.UNLOAD)

    # generation (engine/generate.py) ----------------------------------------------------------
    async def prompt_codec(self) -> PromptCodec:
        return await self.generation.codec()

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                       priority: Priority) -> AsyncIterator[GenerationDelta]:
        async for delta in self.generation.generate(prompt_ids, params, priority=priority):
            yield delta

    async def _prepared_job(self, priority: Priority) -> LoadJob | None:
        """Start the load if cold; its job once the gates are in (None: ready; a failed load raises)."""
        if self.state != "ready" and self._load is None:
            self._start_load(priority, None)
        job = None if self.state == "ready" else self._job
        return await asyncio.shield(job) if job is not None else None

    @property
    def generation_stats(self) -> GenerationStats:
        return self.generation.stats(self.options.kv_cache_bytes if self.causal_lm else 0)  # (memory budget: LMs')

    def _drop_first(self, first: asyncio.Future[Tensors | None]) -> None:
        if not first.cancelled():
            first.exception()  # retrieved: nobody else will
        if self._first_outputs is first:
            self._first_outputs = None

    def _is_ready(self) -> bool:
        return self.state == "ready"

    @property
    def loading_now(self) -> bool:
        """A load of this model runs (its task is not done)."""
        return self._load is not None and not self._load.done()

    def _files_changed(self) -> bool:
        """True when a mapped weight file was rewritten or truncated in place since the load.

        Checked before every warm forward (an fstat per file): such a model must not compute,
        since its tensors view the changed pages, or past the end of a truncated file (SIGBUS).
        """
        changed = [w.path for w in self._watches if w.changed()]
        if changed:
            log.warning("weight files of %s changed in place (%s); reloading it. Replace model "
                        "files by rename.", self.name, ", ".join(map(str, changed)))
        return bool(changed)

    def _reset(self) -> None:
        """Back to unloaded: no model, load, job, first answer or watched files."""
        for w in self._watches:
            w.close()
        self._watches = []
        self._model = None
        self._load = None
        self._job = None
        self._first_outputs = None
        self.state = "unloaded"

    def _forget(self) -> None:
        """Drop everything without the executor's help (it is dead)."""
        if self._load is not None and not self._load.done():
            self._load.cancel()
        self._reset()

    def set_fetch_priority(self, priority: Priority) -> None:
        self._fetch_priority.set(priority)

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Input and output metadata ([{name, datatype, shape}]); outputs known after a load."""
        if self._io is not None:
            return self._io
        return list(self._inputs_meta), []

    async def describe_quietly(self) -> None:
        try:
            async with asyncio.timeout(30):
                await self.describe()
        except Exception as e:  # noqa: BLE001 - metadata stays empty; the load will say why
            log.info("could not read the config of %s yet: %s", self.name, e)

    async def prebuild_quietly(self) -> None:
        try:
            await self.prebuild()
        except Exception as e:  # noqa: BLE001 - the load builds its own skeleton and says why
            log.warning("could not build the skeleton of %s ahead: %s", self.name, e)

    async def prebuild(self) -> None:
        """Build the meta skeleton before the first request; from then on keep one ready."""
        self._ready.wanted = True
        spec = await self.describe()
        dtype = load_options(self.options, 1, 1).dtype
        await self.engine.executor.run(self._ready.build, spec, dtype, priority=Priority.BACKGROUND)

    async def describe(self) -> ModelSpec:
        """Read the model's config files (not its weights) so metadata has its inputs.

        Read once: the startup describe and the skeleton prebuild share one read (a failed one
        is tried again). Loads read the spec afresh; the kept skeleton is checked against that.
        """
        task = self._describing
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._describing = asyncio.ensure_future(self._describe())
        return await asyncio.shield(task)

    async def _describe(self) -> ModelSpec:
        backend, _ = open_with_capabilities(
            self.uri, self.engine.storage.get(scheme_of(self.uri), {}), cache=self.engine.node_cache)
        try:
            spec = await read_model_spec(backend)
            dtype = load_options(self.options, 1, 1).dtype
            if dtype is None:
                sizes = await asyncio.gather(*(backend.stat(k) for k in spec.weight_files))
                weight_bytes = sum(i.size for i in sizes)
            else:  # converted on load: the headers say how many elements of which dtype
                hdrs = await asyncio.gather(*(read_header(backend, k) for k in spec.weight_files))
                weight_bytes = estimated_bytes([t for h in hdrs for t in h.tensors.values()], dtype)
        finally:
            await backend.aclose()
        self._inputs_meta = inputs_meta(spec)
        self.pad_token_id = await asyncio.to_thread(pad_token, spec)  # imports the model's class
        self.causal_lm = is_causal_lm(spec.architecture)
        self.weight_bytes = weight_bytes
        return spec

    async def size_hint(self) -> int | None:
        """Resident bytes a load will need, known before it fetches anything (None: unknown)."""
        if self.nbytes is None and self.weight_bytes is None:
            await self.describe_quietly()
        return self.nbytes or self.weight_bytes

    # internals ---------------------------------------------------------------------------------
    def _start_load(self, priority: Priority, inputs: Inputs | None) -> None:
        """The load runs at ``priority`` until a more urgent request raises it (set_fetch_priority)."""
        loop = asyncio.get_running_loop()
        self.state = "loading"
        self._fetch_priority.set(priority)
        self._job = loop.create_future()
        self._first_outputs = loop.create_future()
        self._load = loop.create_task(self._run_load(inputs), name=f"load {self.name}")

    async def _run_load(self, inputs: Inputs | None) -> None:
        assert self._job is not None and self._first_outputs is not None
        job_fut, out_fut = self._job, self._first_outputs
        engine = self.engine
        timeline = Timeline()
        started = time.monotonic()
        rss = RssSampler().start()  # what the load costs in GB-seconds (rss.py)
        try:
            options = load_options(self.options, engine.read_bytes, engine.load_timeout_s, engine.every_core_when_idle)
            backend, caps = open_with_capabilities(
                self.uri, engine.storage.get(scheme_of(self.uri), {}), cache=engine.node_cache)
            plans = engine.plans.for_load(self.name, backend, options.dtype, root=caps.root)
            ready = self._ready
            try:
                request = LoadRequest(
                    options=options, fetch=engine.fetch, inputs=inputs,
                    priority=self._fetch_priority, cached_plan=self._plan,
                    plan_lookup=plans.lookup if plans is not None else None,
                    skeleton=(lambda spec: ready.take(spec, options.dtype)) if ready.wanted else None,
                    on_prepared=lambda j: _set(job_fut, j),
                )
                model, outputs, job = await engine.cold_start(backend, caps, request, timeline)
                if plans is not None:  # before the answer: a process may exit right after it
                    await plans.store(job.plan)
            finally:
                ready.refill(engine.executor)  # the spare this load took, after it (low priority)
                await backend.aclose()
                timeline.memory = rss.stop().as_dict()
        except BaseException as e:
            rss.stop()
            cause = first_leaf(e)
            err = cause if isinstance(cause, CicadaError) else \
                LoadError(f"loading {self.name} failed: {type(cause).__name__}: {cause}")
            if isinstance(e, asyncio.CancelledError):
                err = LoadError(f"loading {self.name} was cancelled")
            self.state = "unloaded"
            self.last_error = str(err)
            self._load = None
            self._job = None
            for fut in (job_fut, out_fut):
                if not fut.done():
                    fut.set_exception(err)
                    fut.exception()  # retrieved: no "never retrieved" warning when unused
            self._load_error = err
            log.warning('{"event": "load_failed", "model": "%s", "error": "%s"}', self.name, str(err).replace('"', "'"))
            if isinstance(e, asyncio.CancelledError):
                raise
            return  # the error reaches callers through the futures, not the task
        self._model = model
        self._job = None  # the landing, index and tensor table: nothing needs them once ready
        self._plan = job.plan
        self._watches = list(job.landing.watches)
        # What the model holds, not what was read: a serving dtype changes the bytes.
        self.device_bytes = served_bytes(model)
        self.nbytes = sum(self.device_bytes.values())
        self.last_timeline = timeline
        self.last_error = None
        self.cold_starts += 1
        self._io = io_spec(job.spec, outputs if isinstance(outputs, dict) else None)
        self.causal_lm = is_causal_lm(job.spec.architecture)
        self.state = "ready"
        self._load_error = None
        if isinstance(outputs, BaseException):
            # Only the first request's forward failed (bad inputs): it gets that error.
            out_fut.set_exception(outputs)
            out_fut.exception()
        else:
            _set(out_fut, outputs)
        log.info("cold start %s: %.3f s", self.name, time.monotonic() - started)


def _set(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)
