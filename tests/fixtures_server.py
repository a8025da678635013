"""Live-server fixtures: the real aiohttp app on 127.0.0.1:0, driven by real V2 clients.

The server runs on its own event loop in a background thread so that synchronous clients
(tritonclient.http) and async ones (tritonclient.http.aio, kserve) can both talk to it, and so
that a test can hold the dispatcher on the server's loop while clients block.

``FakeEngine`` implements the engine contract (state, single-flight cold load, gated infer)
with a tiny linear model, for lifecycle and scheduling tests that must be deterministic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from aiohttp import web

from cicada_async.config import Config, ModelConfig, ServerConfig
from cicada_async.repository import Repository
from cicada_async.scheduler import Scheduler
from cicada_async.server import REPO_KEY, SCHED_KEY, build_app
from protocols.errors import LoadError

T = TypeVar("T")


# -- fake engine ------------------------------------------------------------------------------------
class FakeTimeline:
    def __init__(self, total_s: float, nbytes: int) -> None:
        self.total_s, self.nbytes = total_s, nbytes

    def summary(self) -> dict[str, Any]:
        return {"total_s": self.total_s, "time_to_first_compute_s": self.total_s / 4, "stall_s": 0.001,
                "utilization": 0.5, "bytes": self.nbytes, "gbps": 1.0,
                "stages": {"skeleton_s": 0.001, "plan_s": 0.001, "fetch_s": self.total_s, "apply_s": 0.001,
                           "compute_s": 0.001}}


class FakeInstance:
    """y = x @ W with W seeded by the model name; a cold load sleeps ``load_s``."""

    def __init__(self, engine: "FakeEngine", name: str, uri: str, options: Any) -> None:
        self.engine, self.name, self.uri, self.options = engine, name, uri, options
        self.state = "unloaded"
        self.nbytes: int | None = None
        self.last_error: str | None = None
        self.last_timeline: FakeTimeline | None = None
        self.loads = 0
        self.unloads = 0
        self.calls: list[tuple[str, int, float]] = []  # (request tag, priority, x[0,0])
        self.fetch_priorities: list[int] = []
        self.fail_next_load = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.load_gate = asyncio.Event()
        self.load_gate.set()
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        self.weight = torch.randn(4, 3, generator=g)
        self._load_task: asyncio.Task[None] | None = None

    async def _do_load(self) -> None:
        self.state = "loading"
        self.loads += 1
        await asyncio.sleep(self.engine.load_s)
        self.nbytes = self.engine.model_bytes
        await self.load_gate.wait()
        if self.fail_next_load:
            self.fail_next_load = False
            self.state = "unloaded"  # as the real engine does; last_error tells the story
            self.last_error = "simulated storage failure"
            raise LoadError(self.last_error)
        self.last_timeline = FakeTimeline(self.engine.load_s, self.nbytes)
        self.last_error = None
        self.state = "ready"

    async def load(self, *, priority: int = 0) -> None:
        if self.state == "ready":
            return
        if self._load_task is None or self._load_task.done():
            self._load_task = asyncio.ensure_future(self._do_load())
        try:
            await asyncio.shield(self._load_task)
        finally:
            if self._load_task.done():
                self._load_task = None

    async def infer(self, inputs: dict[str, torch.Tensor], *, priority: int = 0) -> dict[str, torch.Tensor]:
        if self.state != "ready":
            await self.load(priority=priority)
        x = inputs["x"]
        self.calls.append(("infer", priority, float(x.reshape(-1)[0]) if x.numel() else 0.0))
        await self.gate.wait()
        y = x.to(torch.float32) @ self.weight
        return {"y": y, "argmax": y.argmax(-1)}

    async def unload(self) -> None:
        self.unloads += 1
        self.state = "unloaded"

    def set_fetch_priority(self, priority: int) -> None:
        self.fetch_priorities.append(priority)

    def io_spec(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return ([{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                [{"name": "y", "datatype": "FP32", "shape": [-1, 3]},
                 {"name": "argmax", "datatype": "INT64", "shape": [-1]}])


class FakeEngine:
    def __init__(self, load_s: float = 0.05, model_bytes: int = 1000) -> None:
        self.load_s, self.model_bytes = load_s, model_bytes
        self.instances: dict[str, FakeInstance] = {}

    async def __aenter__(self) -> "FakeEngine":
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def instance(self, name: str, uri: str, options: Any = None) -> FakeInstance:
        if name not in self.instances:
            self.instances[name] = FakeInstance(self, name, uri, options)
        return self.instances[name]


def fake_config(names: tuple[str, ...] = ("alpha", "beta"), **server: Any) -> Config:
    models = {n: ModelConfig(name=n, uri=f"mem://{n}") for n in names}
    return Config(server=ServerConfig(host="127.0.0.1", port=0, **server), models=models)


# -- live server in a thread ------------------------------------------------------------------------
class LiveServer:
    """An app served on 127.0.0.1:<free port> by a private loop in a daemon thread."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-server", daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> "LiveServer":
        self.thread.start()
        self.call(self._start)
        return self

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def stop(self) -> None:
        if self.runner is not None:
            self.call(self.runner.cleanup)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
        """Run ``fn()`` on the server loop and wait for its result (from any thread)."""
        async def wrap() -> T:
            return await fn()
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def sync(self, fn: Callable[[], T], timeout: float = 60) -> T:
        """Run a plain function on the server loop (touching loop-owned state safely)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # pragma: no cover - surfaced to the test
                fut.set_exception(e)
        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def repo(self) -> Repository:
        return self.app[REPO_KEY]

    @property
    def scheduler(self) -> Scheduler:
        return self.app[SCHED_KEY]

    def wait_until(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        import time

        end = time.monotonic() + timeout
        while not self.sync(pred):
            if time.monotonic() > end:
                raise AssertionError("condition not reached in time")
            time.sleep(0.005)


@contextmanager
def live_server(config: Config, **build: Any) -> Iterator[LiveServer]:
    server = LiveServer(build_app(config, **build)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_server(fake_engine: FakeEngine) -> Iterator[LiveServer]:
    """A live server over the fake engine with models 'alpha' and 'beta'."""
    with live_server(fake_config(), engine_factory=lambda cfg: fake_engine, options=lambda cfg: None) as s:
        yield s


def real_config(model_dirs: dict[str, Path], names: tuple[str, ...], **server: Any) -> Config:
    models = {n: ModelConfig(name=n, uri=str(model_dirs[n])) for n in names}
    return Config(server=ServerConfig(host="127.0.0.1", port=0, **server), models=models)


def with_model(config: Config, name: str, **changes: Any) -> Config:
    config.models[name] = dataclasses.replace(config.models[name], **changes)
    return config
