"""The engine: the executor, the fetch scheduler and storage settings every model shares.

``Engine`` is the service's ``protocols.serving.ServingEngine``, and the model instances it
makes (``instance.ModelInstance``) its ``ServedModel``s; ``_conforms`` below makes mypy fail
when either drifts from that seam.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Coroutine, Mapping
from types import FrameType

import torch
from torch import nn

from protocols.serving import Inputs, ModelOptions, Priority, ServedModel, ServingEngine
from protocols.storage import StorageBackend

from cicada_async.engine.capabilities import Capabilities
from cicada_async.engine.executor import PIECE_S, Executor, yield_point
from cicada_async.engine.fetch import FetchScheduler, FetchSettings
from cicada_async.engine.instance import ModelInstance
from cicada_async.engine.job import LoadJob
from cicada_async.engine.modeldir import import_model_libraries
from cicada_async.engine.pipeline import LoadRequest, Outputs, cold_start
from cicada_async.engine.plancache import PlanCache
from cicada_async.engine.reads import DEFAULT_READ_BYTES
from cicada_async.engine.timeline import Timeline

__all__ = ["Engine", "Inputs", "ModelInstance", "ModelOptions"]  # re-exported for callers and tests


_last_look = threading.local()  # .at: when this thread last looked for a yield in a build


def _yield_between_submodules(_parent: nn.Module, _name: str, _child: nn.Module) -> None:
    """A model's constructor on the executor (a skeleton build: 40-50 ms of gpt2-medium in one
    turn, measured) yields between the submodules it registers, every ``PIECE_S`` at most
    (issue 28 item 4). Not while transformers builds under another default dtype
    (``local_torch_dtype`` sets it for the whole process: a forward let in meanwhile would make
    its tensors in it), nor inside an import (a module's lock held: a job let in that imports
    the same module would wait for this one, which waits for the turn)."""
    now = time.monotonic()
    if now - getattr(_last_look, "at", 0.0) < PIECE_S or torch.get_default_dtype() is not torch.float32:
        return
    _last_look.at = now
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return
        frame = frame.f_back
    yield_point(PIECE_S)


_BUILDS_YIELD: list[torch.utils.hooks.RemovableHandle] = []  # installed once per process


class Engine:
    """Owns the executor thread, the fetch scheduler and storage settings."""

    def __init__(
        self,
        *,
        storage: Mapping[str, Mapping[str, object]] | None = None,
        read_concurrency: int = 4,
        read_bytes: int = DEFAULT_READ_BYTES,
        queue_bytes: int = 256 << 20,
        read_timeout_s: float = 60.0,
        load_timeout_s: float = 600.0,
        warm_imports: bool = True,
        shared: bool = True,
        node_cache: Mapping[str, object] | None = None,
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
        if not _BUILDS_YIELD:
            _BUILDS_YIELD.append(nn.modules.module.register_module_module_registration_hook(_yield_between_submodules))
        self.executor.start()
        if self.warm_imports:
            # transformers takes seconds to import; do it on the idle executor thread now, so a
            # process started by a scale-from-zero pays it while waiting for the first request.
            self.executor.submit(import_model_libraries, priority=Priority.IMPORTS)
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

    def prebuild(self, model: ServedModel) -> None:
        """Build ``model``'s skeleton ahead, at low priority, and keep one ready after loads
        (a no-op for a model this engine did not make)."""
        if isinstance(model, ModelInstance):
            self._background(model.prebuild_quietly(), f"prebuild {model.name}")

    def no_load_running(self) -> bool:
        """True while no model of this engine loads (a warm forward may take every core)."""
        return not any(i.loading_now for i in self.instances.values())

    async def cold_start(self, backend: StorageBackend, capabilities: Capabilities, request: LoadRequest,
                         timeline: Timeline) -> tuple[nn.Module, Outputs, LoadJob]:
        """One load through the pipeline, on this engine's executor and fetch scheduler."""
        return await cold_start(backend, self.executor, self.scheduler, request,
                                timeline=timeline, capabilities=capabilities)

    def _background(self, coro: Coroutine[object, object, None], name: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        except RuntimeError:
            coro.close()  # no loop (an instance made outside one): metadata comes with the load
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _conforms(engine: Engine, model: ModelInstance) -> tuple[ServingEngine, ServedModel]:
    """Never called: mypy checks here that the engine still implements the serving seam."""
    return engine, model
