"""Model lifecycle: name -> engine instance, explicit load/unload, keep-alive and memory budget.

The repository decides *when* weights are resident; the scheduler decides which request runs.
Both live on the event loop; the engine does the work on its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

import torch

from cicada_async.service.config import Config, ModelConfig, scan_repository
from cicada_async.service.metrics import STATES, Metrics
from protocols.errors import CicadaError, ModelNotFound, Overloaded
from protocols.serving import ModelOptions, ModelState, Priority, ServedModel, ServingEngine

log = logging.getLogger("cicada.repository")

# V2 repository-extension state names.
# How long a load waits for models in use to become evictable before it is refused.
BUDGET_WAIT_S = 30.0

_INDEX_STATE = {"unloaded": "UNAVAILABLE", "loading": "LOADING", "ready": "READY", "failed": "UNAVAILABLE"}


def model_options(cfg: ModelConfig) -> ModelOptions:
    """How the engine serves a configured model."""
    return ModelOptions(dtype=cfg.dtype, device=cfg.device, kv_cache_bytes=cfg.kv_cache_bytes,
                        max_sequences=cfg.max_sequences)


class IndexEntry(TypedDict):
    """One model in the repository extension's index."""

    name: str
    version: str
    state: str  # READY, LOADING, UNLOADING or UNAVAILABLE
    reason: str


@dataclass(eq=False)
class ModelEntry:
    """One model the server knows, with the bookkeeping lifecycle decisions need."""

    config: ModelConfig
    instance: ServedModel
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests inside the engine (warm forwards and cold starts)
    loading: asyncio.Future[None] | None = None  # a load we started (API load or cold-start request)
    unloading: bool = False
    fetch_priority: Priority | None = None  # last value passed to set_fetch_priority
    reserved: int = 0  # bytes a load in progress will hold, counted before it has planned
    # The tracked load ended before the engine was asked (refused or cancelled while making
    # room): no cold start happened, so none is counted as failed.
    never_started: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> ModelState:
        return self.instance.state

    @property
    def failed(self) -> bool:
        """The last load failed and nothing is retrying it."""
        return self.loading is None and self.state != "ready" and (
            self.state == "failed" or bool(self.instance.last_error))

    @property
    def device(self) -> str:
        """The device the model is served on, as the budget names it (``cuda`` is ``cuda:0``)."""
        return device_key(self.config.device)

    @property
    def footprint(self) -> dict[str, int]:
        """Bytes the model holds (or a load in progress will hold), per device.

        A loaded model: the bytes its tensors hold on each device (served bytes, in the serving
        dtype, not the checkpoint's). Before that: the reservation its load made (``size_hint``,
        on the model's device). A causal LM's KV cache budget is charged to its device on top,
        whether or not the cache is filled yet: sequences may fill it at any time.
        """
        if self.state not in ("ready", "loading") and self.loading is None:
            return {self.device: self.reserved} if self.reserved else {}
        held = {device_key(d): n for d, n in self.instance.device_bytes.items() if n}
        if not held:  # not loaded yet: the reservation (weights and KV cache) stands for it
            n = self.reserved or int(self.instance.nbytes or 0)
            return {self.device: n} if n else {}
        kv = self.instance.generation_stats.kv_cache_bytes_budget
        if kv:
            held[self.device] = held.get(self.device, 0) + kv
        return held

    @property
    def resident_bytes(self) -> int:
        """Bytes held on every device together (the ``resident`` metric)."""
        return sum(self.footprint.values())

    def bytes_on(self, device: str) -> int:
        return self.footprint.get(device, 0)


def device_key(device: str) -> str:
    """One name per device: ``cuda`` is the current CUDA device (as the engine loads it)."""
    d = torch.device(device)
    if str(d) == "cuda":  # no index (torch's stubs type ``index`` as never None)
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"
    return str(d)


class Repository:
    """Models by name; owns the keep-alive/budget maintenance loop."""

    def __init__(self, engine: ServingEngine, config: Config, metrics: Metrics,
                 options: Callable[[ModelConfig], ModelOptions] = model_options) -> None:
        self.engine = engine
        self._options = options
        self.config = config
        self.metrics = metrics
        self.models: dict[str, ModelEntry] = {}
        self.scan_errors: dict[str, str] = {}  # folder -> why a rescan could not add it
        # Set by the scheduler: queued request count per model, and a wake-up for the dispatcher
        # when a model changes state.
        self.queued: Callable[[str], int] = lambda name: 0
        self.on_change: Callable[[], None] = lambda: None
        self._budget_lock = asyncio.Lock()  # loads make room one at a time
        for cfg in config.models.values():
            self._add(cfg)
        metrics.add_collector(self._collect)

    # -- lookup -------------------------------------------------------------------------------
    def _add(self, cfg: ModelConfig) -> ModelEntry:
        inst = self.engine.instance(cfg.name, cfg.uri, self._options(cfg))
        entry = self.models[cfg.name] = ModelEntry(cfg, inst)
        # The skeleton is built in the background at low priority and kept across unloads,
        # so a cold start skips the build; a failure logs and the load builds it.
        self.engine.prebuild(inst)
        return entry

    def get(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model {name!r}")
        return entry

    def scan(self) -> dict[str, ModelConfig]:
        """The model repository directory's models (index endpoint). Touches only the disk and
        this repository's immutable config, so it may run in a worker thread; the result is
        applied on the loop by ``add_scanned`` (the loop iterates ``models`` and the engine's
        instances, and describe/prebuild need the loop)."""
        root = self.config.model_repository
        return {} if root is None else scan_repository(root)

    def add_scanned(self, found: dict[str, ModelConfig]) -> list[str]:
        """Add the scanned models not known yet; on the event loop. A model that cannot be
        added is logged and listed in the index as UNAVAILABLE with its reason, and the others
        are still added: one bad folder must not hide the rest."""
        added = []
        for name, cfg in found.items():
            if name in self.models:
                continue
            try:
                self._add(cfg)
            except CicadaError as e:
                self.scan_errors[name] = str(e)
                log.warning("rescan: model %s not added: %s", name, e,
                            extra={"event": "rescan", "model": name, "error": str(e)})
                continue
            self.scan_errors.pop(name, None)
            added.append(name)
        return added

    def index(self) -> list[IndexEntry]:
        out: list[IndexEntry] = []
        for e in self.models.values():
            state = "UNLOADING" if e.unloading else _INDEX_STATE.get(e.state, "UNAVAILABLE")
            if e.loading is not None and state != "READY":
                state = "LOADING"
            out.append(IndexEntry(name=e.name, version="1", state=state, reason=e.instance.last_error or ""))
        out += [IndexEntry(name=n, version="1", state="UNAVAILABLE", reason=why)
                for n, why in self.scan_errors.items() if n not in self.models]
        return out

    # -- loads ----------------------------------------------------------------------------------
    def track_load(self, entry: ModelEntry, task: asyncio.Future[None]) -> None:
        """Register a load in progress (cold-start request or API) so nothing starts a second."""
        entry.loading = task
        entry.fetch_priority = None
        t0 = time.monotonic()
        was_ready = entry.state == "ready"

        def done(t: asyncio.Future[None]) -> None:
            entry.loading = None
            entry.reserved = 0
            entry.last_used = time.monotonic()
            ok = entry.state == "ready"
            if not was_ready and not entry.never_started:
                self._log_cold_start(entry, ok, time.monotonic() - t0)
            entry.never_started = False
            self.on_change()

        task.add_done_callback(done)

    def _log_cold_start(self, entry: ModelEntry, ok: bool, wall_s: float) -> None:
        timeline = entry.instance.last_timeline
        summary: dict[str, object] | None = None
        if timeline is not None:
            try:
                summary = dict(timeline.summary())
            except Exception:  # a broken summary must not take the load's result with it
                log.exception("timeline summary failed for %s", entry.name)
        self.metrics.record_cold_start(entry.name, ok, summary)
        log.info(
            "cold start",
            extra={"event": "cold_start", "model": entry.name, "ok": ok, "wall_s": round(wall_s, 6),
                   "error": None if ok else entry.instance.last_error, "timeline": summary},
        )

    async def load(self, name: str) -> None:
        """Repository API load: returns once the model is ready (joins a load in progress)."""
        entry = self.get(name)
        while entry.unloading:
            await asyncio.sleep(0.01)
        if entry.loading is None:
            if entry.state == "ready":
                return
            await self.make_room(entry)
            if entry.loading is None:  # make_room awaited: someone may have started one
                # The model's own default priority: an API load is no request's.
                task = asyncio.ensure_future(entry.instance.load(priority=Priority(entry.config.default_priority)))
                self.track_load(entry, task)
        assert entry.loading is not None
        # Shield: a client hanging up must not cancel a load other requests are waiting for.
        await asyncio.shield(entry.loading)

    async def unload(self, name: str, reason: str = "api") -> None:
        """Drop a model's weights; waits for a load in progress and for the forward in flight."""
        entry = self.get(name)
        while entry.loading is not None:
            try:
                await asyncio.shield(entry.loading)
            except CicadaError:
                pass
        if entry.unloading or entry.state == "unloaded":
            return
        entry.unloading = True
        try:
            await entry.instance.unload()
            self.metrics.evictions.inc(model=name, reason=reason)
            log.info("unloaded", extra={"event": "unload", "model": name, "reason": reason})
        finally:
            entry.unloading = False
            self.on_change()

    # -- keep-alive and memory budget ------------------------------------------------------------
    def idle(self, entry: ModelEntry) -> bool:
        return (entry.state == "ready" and entry.busy == 0 and entry.loading is None
                and not entry.unloading and self.queued(entry.name) == 0)

    def resident_bytes(self, device: str | None = None) -> int:
        """Bytes held by every model on ``device`` (None: on every device together)."""
        if device is None:
            return sum(e.resident_bytes for e in self.models.values())
        return sum(e.bytes_on(device) for e in self.models.values())

    def budget_for(self, device: str) -> int | None:
        """The bytes models may hold on ``device``: the host's memory budget for the CPU; for a
        GPU its whole memory (its own budget: a CUDA model never evicts CPU models, nor the
        other way round), None where unbounded."""
        if device == "cpu":
            return self.config.server.memory_budget_bytes
        d = torch.device(device)
        if d.type == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(d).total_memory)
        return None

    async def make_room(self, incoming: ModelEntry | None = None) -> None:
        """Evict idle models, least recently used first, until every device's budget holds.

        Each device has its own budget (``budget_for``): host memory for CPU models, the GPU's
        memory for models served there; a model is charged its served bytes on each device it
        holds some, and a causal LM its KV cache budget on its device. An incoming load's size
        is known before it fetches (``size_hint``: served bytes from the files' headers). Loads
        make room one at a time and reserve their size once it fits, so concurrent loads cannot
        overrun a budget between them; one that must wait for models in use to go idle waits
        (bounded), and one that can never fit fails here, before any fetch.
        """
        if incoming is None:
            if not self._budget_lock.locked():  # a waiting load is already making room
                async with self._budget_lock:
                    for device in self._devices():
                        budget = self.budget_for(device)
                        if budget is not None:
                            await self._evict_until(device, budget, None, 0)
            return
        device = incoming.device
        budget = self.budget_for(device)
        if budget is None:
            return
        need = 0
        if not incoming.resident_bytes:
            need = await incoming.instance.size_hint() or 0
            # The KV cache budget is a causal LM's own (known once described: size_hint did).
            need += incoming.instance.generation_stats.kv_cache_bytes_budget
            if need > budget:
                raise Overloaded(f"model {incoming.name!r} needs {need} bytes, more than the whole "
                                 f"memory budget ({budget} bytes) of {device}", self.config.server.retry_after_s)
        async with self._budget_lock:
            await self._evict_until(device, budget, incoming, need)
            incoming.reserved = need  # counted from now on: the next load sees it

    def _devices(self) -> list[str]:
        return sorted({d for e in self.models.values() for d in e.footprint})

    async def _evict_until(self, device: str, budget: int, incoming: ModelEntry | None, need: int) -> None:
        give_up = time.monotonic() + BUDGET_WAIT_S
        while self.resident_bytes(device) + need > budget:
            # Only models holding bytes on this device free any of it.
            victims = sorted((e for e in self.models.values()
                              if e is not incoming and self.idle(e) and e.bytes_on(device)),
                             key=lambda e: e.last_used)
            in_use = [e for e in self.models.values()
                      if e.bytes_on(device) and e is not incoming and e not in victims]
            enough = self.resident_bytes(device) + need - sum(e.bytes_on(device) for e in victims) <= budget
            if victims and (enough or not in_use or incoming is None):
                # Only when evicting can make room: emptying idle models (hot small ones too)
                # while the budget is held by models in use would cost cold starts for nothing.
                await self.unload(victims[0].name, reason="memory_budget")
                continue
            if incoming is None or (incoming.bytes_on(device) + need) == 0:
                log.warning("memory budget exceeded and nothing idle to evict",
                            extra={"event": "budget", "device": device,
                                   "resident": self.resident_bytes(device), "budget": budget})
                return
            if in_use and time.monotonic() < give_up:
                await asyncio.sleep(0.02)  # models in use become idle (evictable) soon
                continue
            held = ", ".join(f"{e.name} ({e.bytes_on(device)})" for e in in_use)
            raise Overloaded(f"model {incoming.name!r} needs {incoming.bytes_on(device) + need} bytes and "
                             f"the memory budget ({budget}) is held by models in use: {held}; retry later",
                             self.config.server.retry_after_s)

    async def cancel_waiting_loads(self) -> None:
        """Drain deadline: cancel the cold starts still waiting for room (``make_room``).

        The engine has no load for them yet (their model is not "loading"), so cancelling the
        engine's loads misses them; left running, one would evict a model and start its load
        mid-shutdown once the budget frees, and teardown would wait for it (up to
        ``BUDGET_WAIT_S``) until the process's exit backstop. Their requests fail as the drain
        fails the others (ShuttingDown).
        """
        waiting = [e.loading for e in self.models.values()
                   if e.loading is not None and not e.loading.done() and e.state != "loading"]
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    async def maintain(self) -> None:
        """Background loop: unload models idle past keep_alive_s, enforce the budget."""
        interval = self.config.server.keep_alive_check_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except CicadaError as e:
                log.warning("maintenance failed: %s", e)

    async def sweep(self) -> None:
        now = time.monotonic()
        for e in list(self.models.values()):
            ka = e.config.keep_alive_s
            if ka and self.idle(e) and now - e.last_used >= ka:
                await self.unload(e.name, reason="keep_alive")
        await self.make_room()

    def _collect(self) -> None:
        for e in self.models.values():
            for s in STATES:
                self.metrics.state.set(1 if e.state == s else 0, model=e.name, state=s)
        self.metrics.resident.set(self.resident_bytes())
