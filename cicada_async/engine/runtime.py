"""Engine and model instances: the serverless lifecycle of models on one executor thread."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import torch
from torch import nn

from backends import open_backend, scheme_of
from protocols.errors import CicadaError, LoadError
from protocols.manifest import Plan

from cicada_async.engine.fetch import FetchScheduler, FetchSettings
from cicada_async.engine.executor import Executor
from cicada_async.engine.forward import inputs_meta, io_spec, pad_token, run_forward
from cicada_async.engine.job import LoadJob, ModelOptions
from cicada_async.engine.modeldir import ModelSpec, import_model_libraries, read_model_spec
from cicada_async.engine.pipeline import LoadRequest, cold_start, first_leaf
from cicada_async.engine.plancache import PlanCache
from cicada_async.engine.ready import PREBUILD_PRIORITY, ReadySkeleton
from cicada_async.engine.reads import DEFAULT_READ_BYTES
from cicada_async.engine.rss import RssSampler
from cicada_async.engine.timeline import Timeline

log = logging.getLogger(__name__)

# A forward's inputs, or a callable that returns them when the forward starts.
Inputs = dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]]

class Engine:
    """Owns the executor thread, the fetch scheduler and storage settings."""

    def __init__(
        self,
        *,
        storage: Mapping[str, Mapping[str, Any]] | None = None,
        read_concurrency: int = 4,
        read_bytes: int = DEFAULT_READ_BYTES,
        queue_bytes: int = 256 << 20,
        read_timeout_s: float = 60.0,
        load_timeout_s: float = 600.0,
        warm_imports: bool = True,
        shared: bool = True,
        node_cache: Mapping[str, Any] | None = None,
        plan_dir: str | os.PathLike[str] | None = None,
        plan_files: bool = True,
        every_core_when_idle: bool = False,
    ) -> None:
        # A warm forward while no load fetches anywhere: every usable core, not torch's setting.
        self.every_core_when_idle = every_core_when_idle
        self.node_cache = dict(node_cache or {})  # the [cache] table's dir and max_bytes
        self.warm_imports = warm_imports
        # False: the serialized baseline (a waiting load keeps all compute; reads FIFO).
        self.shared = shared
        self.plans = PlanCache(plan_dir, enabled=plan_files)  # see plancache.py for where
        self.storage = {k: dict(v) for k, v in (storage or {}).items()}
        self.fetch = FetchSettings(read_concurrency, queue_bytes, read_timeout_s)
        self.read_bytes = read_bytes
        self.load_timeout_s = load_timeout_s
        self.executor = Executor(shared=shared)
        self.scheduler = FetchScheduler(read_concurrency, prioritized=shared)
        self.instances: dict[str, ModelInstance] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "Engine":
        self.executor.start()
        if self.warm_imports:
            # transformers takes seconds to import; do it on the idle executor thread now, so a
            # process started by a scale-from-zero pays it while waiting for the first request.
            self.executor.submit(import_model_libraries, priority=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        for inst in list(self.instances.values()):
            await inst.unload()
        # join() blocks: keep it off the event loop.
        await asyncio.to_thread(self.executor.stop)

    @property
    def healthy(self) -> bool:
        """False once the executor thread has died or been stopped: report not ready."""
        return self.executor.alive

    async def restart_executor(self) -> None:
        """Replace a dead executor thread. Loaded models are dropped: their state is unknown."""
        for inst in list(self.instances.values()):
            inst._forget()
        old = self.executor
        self.executor = Executor(shared=self.shared)
        self.executor.start()
        await asyncio.to_thread(old.stop, 1.0)

    def instance(
        self, name: str, uri: str, options: ModelOptions | None = None, *, describe: bool = True
    ) -> "ModelInstance":
        inst = ModelInstance(self, name, uri, options or ModelOptions())
        self.instances[name] = inst
        if describe:
            # Metadata (input names, dtypes) from the config files, without loading weights.
            self._background(inst.describe_quietly(), f"describe {name}")
        return inst

    def prebuild(self, inst: "ModelInstance") -> None:
        """Build ``inst``'s skeleton ahead, at low priority, and keep one ready after loads."""
        self._background(inst.prebuild_quietly(), f"prebuild {inst.name}")

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        except RuntimeError:
            coro.close()  # no loop (an instance made outside one): metadata comes with the load
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class ModelInstance:
    """One servable model: unloaded -> loading -> ready, back to unloaded on unload or failure."""

    def __init__(self, engine: Engine, name: str, uri: str, options: ModelOptions) -> None:
        self.engine = engine
        self.name = name
        self.uri = uri
        self.options = options
        self.state = "unloaded"
        self.nbytes: int | None = None
        self.weight_bytes: int | None = None  # the weight files' sizes, before any load
        self._describing: asyncio.Future[ModelSpec] | None = None
        self.last_error: str | None = None
        self.last_timeline: Timeline | None = None
        self.last_used = time.monotonic()
        self.cold_starts = 0
        self._model: nn.Module | None = None
        self._load: asyncio.Task[None] | None = None
        self._job: asyncio.Future[LoadJob] | None = None
        self._plan: Plan | None = None  # reused by later loads of the same weights
        self._fetch_priority = 0.0
        self._io: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        self._first_outputs: asyncio.Future[dict[str, torch.Tensor] | None] | None = None
        self._load_error: BaseException | None = None
        self._inputs_meta: list[dict[str, Any]] = []
        self.pad_token_id: int | None = None  # set by describe(): padding of token batches allowed
        self._watches: list[Any] = []  # mapped weight files the ready model's tensors view
        self._ready = ReadySkeleton(name)  # kept across unloads once prebuild() asked for it
        options.load_options(read_bytes=1, load_timeout_s=1)  # validate early

    # public API --------------------------------------------------------------------------------
    async def infer(self, inputs: "Inputs", *, priority: int = 0) -> dict[str, torch.Tensor]:
        """One forward. ``inputs`` may be a callable, asked on the loop just before the forward
        starts (for a cold start: when the gated forward starts), so a batch forms late."""
        self.last_used = time.monotonic()
        try:
            if self.state == "ready" and self._model is not None and self._files_changed():
                await self.unload()  # the next lines cold-start it from the files as they are now
            if self.state == "ready" and self._model is not None:
                batch, engine = inputs() if callable(inputs) else inputs, self.engine
                every = engine.every_core_when_idle and all(i._load is None or i._load.done()
                                                            for i in engine.instances.values())
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
                    # tensors (outside any memory budget) until the next load.
                    if self._first_outputs is first and first.done():
                        self._first_outputs = None
                if out is not None:
                    return out
            assert self._job is not None
            load = self._load
            job = await asyncio.shield(self._job)
            joining = inputs() if callable(inputs) else inputs
            device = torch.device(self.options.device)

            def joined() -> dict[str, torch.Tensor]:
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

    async def load(self, *, priority: int = 0) -> None:
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
        if self.state != "ready":
            raise self._load_error or LoadError(f"loading {self.name} failed")

    async def unload(self) -> None:
        load = self._load
        if load is not None and not load.done():
            load.cancel()
            try:
                await load
            except (asyncio.CancelledError, CicadaError):
                pass
        model = self._model
        self._reset()
        if model is not None and self.engine.executor.alive:
            # Drop the last reference on the executor thread, after any forward in flight.
            await self.engine.executor.run(lambda: None)
        del model

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

    def set_fetch_priority(self, priority: int) -> None:
        self._fetch_priority = float(priority)

    def io_spec(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
        dtype = self.options.load_options(1, 1).dtype
        await self.engine.executor.run(self._ready.build, spec, dtype, priority=PREBUILD_PRIORITY)

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
        backend = open_backend(self.uri, self.engine.storage.get(scheme_of(self.uri), {}), cache=self.engine.node_cache)
        try:
            spec = await read_model_spec(backend)
            sizes = await asyncio.gather(*(backend.stat(k) for k in spec.weight_files))
        finally:
            await backend.aclose()
        self._inputs_meta = inputs_meta(spec)
        self.pad_token_id = await asyncio.to_thread(pad_token, spec)  # imports the model's class
        self.weight_bytes = sum(i.size for i in sizes)
        return spec

    async def size_hint(self) -> int | None:
        """Resident bytes a load will need, known before it fetches anything (None: unknown)."""
        if self.nbytes is None and self.weight_bytes is None:
            await self.describe_quietly()
        return self.nbytes or self.weight_bytes

    # internals ---------------------------------------------------------------------------------
    def _start_load(self, priority: int, inputs: "Inputs | None") -> None:
        loop = asyncio.get_running_loop()
        self.state = "loading"
        self._fetch_priority = float(priority)
        self._job = loop.create_future()
        self._first_outputs = loop.create_future()
        self._load = loop.create_task(self._run_load(inputs, priority), name=f"load {self.name}")

    async def _run_load(self, inputs: "Inputs | None", priority: int) -> None:
        assert self._job is not None and self._first_outputs is not None
        job_fut, out_fut = self._job, self._first_outputs
        engine = self.engine
        timeline = Timeline()
        started = time.monotonic()
        rss = RssSampler().start()  # what the load costs in GB-seconds (rss.py)
        try:
            options = self.options.load_options(engine.read_bytes, engine.load_timeout_s, engine.every_core_when_idle)
            backend = open_backend(self.uri, engine.storage.get(scheme_of(self.uri), {}), cache=engine.node_cache)
            plans = engine.plans.for_load(self.name, backend, options.dtype)
            ready = self._ready
            try:
                request = LoadRequest(
                    options=options, fetch=engine.fetch, inputs=inputs,
                    priority=lambda: self._fetch_priority, cached_plan=self._plan,
                    plan_lookup=plans.lookup if plans is not None else None,
                    skeleton=(lambda spec: ready.take(spec, options.dtype)) if ready.wanted else None,
                    on_prepared=lambda j: _set(job_fut, j),
                )
                model, outputs, job = await cold_start(
                    backend, engine.executor, engine.scheduler, request, timeline=timeline
                )
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
        self._watches = list(getattr(job.landing, "watches", ()))
        self.nbytes = job.plan.nbytes
        self.last_timeline = timeline
        self.last_error = None
        self.cold_starts += 1
        self._io = io_spec(job.spec, outputs if isinstance(outputs, dict) else None)
        self.state = "ready"
        self._load_error = None
        if isinstance(outputs, BaseException):
            # Only the first request's forward failed (bad inputs): it gets that error.
            out_fut.set_exception(outputs)
            out_fut.exception()
        else:
            _set(out_fut, outputs)
        log.info("cold start %s: %.3f s", self.name, time.monotonic() - started)


def _set(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
