"""The data plane: the one core that every front end (HTTP, gRPC, ...) calls, through typed methods.

A front end translates its wire format into these calls and their answers back, and nothing
else; the health, metadata, repository, statistics, authentication and infer decisions are
made here once, so that the transports cannot drift apart. The data plane owns the engine
(held only as ``protocols.serving.ServingEngine``), the repository, the scheduler, the body
budget, metrics, statistics and the serving state; ``async with`` starts and stops the
engine, the scheduler and the maintenance and watchdog tasks.

Nothing here imports a transport (aiohttp, grpc): ``tests/service/test_dataplane.py`` checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from types import TracebackType

from cicada_async.service import auth, describe
from cicada_async.service.checks import check_inputs, check_name, check_outputs, unknown_input
from cicada_async.service.config import Config
from cicada_async.service.generation import Generation, Generations, Prompt
from cicada_async.service.limits import BodyBudget
from cicada_async.service.metrics import Metrics
from cicada_async.service.repository import IndexEntry, ModelEntry, Repository
from cicada_async.service.scheduler import Scheduler
from cicada_async.service.state import ServingState
from cicada_async.service.stats import Outcome, Stats
from protocols import v2
from protocols.errors import BadRequest, InferenceError, Overloaded, ShuttingDown
from protocols.generation import SamplingParams
from protocols.serving import Priority, ServingEngine, Tensors

log = logging.getLogger("cicada.server")

SERVER_NAME = "cicada-async"
SERVER_VERSION = "0.1.0"
# Only what is served: the binary tensor extension (HTTP), the model repository (index, load,
# unload), schedule_policy (the priority and timeout parameters), statistics (/stats) and
# model_configuration (/config); over gRPC too, except binary_tensor_data (raw contents instead).
EXTENSIONS = ("binary_tensor_data", "model_repository", "schedule_policy", "statistics", "model_configuration")

EngineFactory = Callable[[Config], AbstractAsyncContextManager[ServingEngine]]
JsonDoc = dict[str, object]  # a JSON object as the V2 protocol and Triton's extensions define it


@dataclass(frozen=True)
class ServerMetadata:
    """The V2 server metadata: who answers, and which protocol extensions it serves."""

    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class Readiness:
    """Whether the server takes work now; ``reason`` says why not."""

    ready: bool
    reason: str = ""


@dataclass(frozen=True)
class ModelReadiness:
    """Whether a request for a model sent now will be answered; ``reason`` says why not."""

    name: str
    ready: bool
    state: str
    reason: str = ""


class DataPlane:
    """Everything the server does, whichever transport asked; one per process (or test server).

    Created before any transport listens (cheap: metrics, statistics, state, limits, tokens);
    ``async with`` makes the engine, repository and scheduler, so ``repository``, ``scheduler``
    and ``engine`` exist only inside it. Everything runs on the event loop (the engine does
    its torch work on its own threads).
    """

    def __init__(self, config: Config, engine_factory: EngineFactory) -> None:
        self.config = config
        self.metrics = Metrics()
        self.stats = Stats()
        self.state = ServingState()
        self.budget = BodyBudget(config.server.max_body_bytes_in_flight)
        self.tokens = auth.TokenSet.from_config(config.server.auth)
        self._engine_factory = engine_factory
        self._engine: ServingEngine | None = None
        self._repo: Repository | None = None
        self._sched: Scheduler | None = None
        self._gen: Generations | None = None
        self._stack: AsyncExitStack | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> DataPlane:
        async with AsyncExitStack() as stack:
            engine = await stack.enter_async_context(self._engine_factory(self.config))
            repo = Repository(engine, self.config, self.metrics)
            sched = Scheduler(repo, max_queue_total=self.config.server.max_queue_total,
                              retry_after_s=self.config.server.retry_after_s,
                              on_shed=lambda model, reason: self.metrics.shed.inc(model=model, reason=reason),
                              on_batch=self._executed)
            self._engine, self._repo, self._sched = engine, repo, sched
            self._gen = Generations(repo, self.metrics)
            self.metrics.add_collector(self._collect_pending)
            self.metrics.add_collector(self._gen.collect)
            sched.start()
            stack.push_async_callback(sched.aclose)
            tasks = [asyncio.create_task(repo.maintain(), name="cicada-maintenance"),
                     asyncio.create_task(self._watch_engine(), name="cicada-watchdog")]
            stack.push_async_callback(_cancel, tasks)  # first out: before the scheduler closes
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Stop the watchdog and maintenance, fail what is still queued, tear the engine down."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    @property
    def engine(self) -> ServingEngine:
        if self._engine is None:
            raise RuntimeError("the data plane has not started (use it inside `async with`)")
        return self._engine

    @property
    def repository(self) -> Repository:
        if self._repo is None:
            raise RuntimeError("the data plane has not started (use it inside `async with`)")
        return self._repo

    @property
    def scheduler(self) -> Scheduler:
        if self._sched is None:
            raise RuntimeError("the data plane has not started (use it inside `async with`)")
        return self._sched

    def begin_drain(self) -> None:
        """SIGTERM: readiness turns 503 and new work is refused; what is queued still runs."""
        self.state.draining = True
        if self._sched is not None:
            self._sched.begin_drain()

    async def cancel_loads(self) -> None:
        """Cancel cold starts in flight (drain deadline) so that nothing waits on a slow origin."""
        if self._repo is None:
            return
        loading = [e.instance for e in self._repo.models.values() if e.state == "loading"]
        await asyncio.gather(*(inst.unload() for inst in loading), return_exceptions=True)

    async def _watch_engine(self) -> None:
        """Maintenance tick: notice a dead executor thread and replace it.

        A dead executor is noticed on one tick and replaced on the next, so that readiness probes
        see 503 for at least one interval (the load balancer stops sending) while requests
        already queued are held, not failed; they run once the new thread is up.
        """
        interval = self.config.server.keep_alive_check_s
        engine, sched, state = self.engine, self.scheduler, self.state
        while True:
            await asyncio.sleep(interval)
            if engine.healthy:
                continue
            state.restarting = True
            sched.hold()
            log.error("executor thread is dead; restarting it", extra={"event": "executor_dead"})
            try:
                await asyncio.sleep(interval)
                await engine.restart_executor()
                state.executor_restarts += 1
                log.warning("executor restarted; loaded models were dropped",
                            extra={"event": "executor_restarted", "restarts": state.executor_restarts})
            except Exception:  # keep watching: the next tick tries again
                log.exception("executor restart failed")
            finally:
                state.restarting = False
                sched.release()

    # -- health and metadata --------------------------------------------------------------------
    def live(self) -> bool:
        """Liveness: the process answers (the engine's health is readiness, not liveness)."""
        return True

    def engine_healthy(self) -> bool:
        """False from the moment the executor thread is found dead until it has been replaced."""
        if self.state.restarting:
            return False
        return self._engine is None or self._engine.healthy

    def readiness(self) -> Readiness:
        """Ready as soon as requests can be accepted: a cold model is loaded by its first request,
        which waits in the heap meanwhile (docs/service.md, "Readiness policy")."""
        if self.state.draining:
            return Readiness(False, "server is shutting down")
        if not self.engine_healthy():
            return Readiness(False, "the engine's executor thread died; restarting it")
        return Readiness(True)

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, SERVER_VERSION, EXTENSIONS)

    def model_names(self) -> list[str]:
        return sorted(self.repository.models)

    def model(self, name: str, version: str | None = None) -> ModelEntry:
        """The model a request names (checked; any version but 1 is 404)."""
        return self.repository.get(check_name(name, version))

    def model_metadata(self, name: str, version: str | None = None) -> JsonDoc:
        return describe.metadata(self.model(name, version))

    def model_config(self, name: str, version: str | None = None) -> JsonDoc:
        """Triton's model configuration extension, in its JSON form."""
        return describe.triton_config(self.model(name, version))

    def model_readiness(self, name: str, version: str | None = None) -> ModelReadiness:
        """Ready when a request sent now will be answered: unloaded models are loaded on
        demand; only draining or a failed last load is not ready."""
        entry = self.model(name, version)
        if self.state.draining:
            return ModelReadiness(entry.name, False, entry.state, "server is shutting down")
        if entry.failed:
            return ModelReadiness(entry.name, False, entry.state,
                                  f"model {entry.name!r} failed to load: {entry.instance.last_error}")
        return ModelReadiness(entry.name, True, entry.state)

    def statistics(self, name: str | None = None, version: str | None = None) -> list[JsonDoc]:
        """Statistics of one model, or of every model (zeros for those never asked)."""
        repo = self.repository
        names = [repo.get(check_name(name, version)).name] if name else sorted(repo.models)
        return [self.stats.of(n).as_dict() for n in names]

    def render_metrics(self) -> bytes:
        """The Prometheus text exposition (``metrics.CONTENT_TYPE``)."""
        return self.metrics.render()

    # -- repository extension -----------------------------------------------------------------
    async def repository_index(self) -> list[IndexEntry]:
        """Every model and its state, after picking up new folders of the model repository."""
        repo = self.repository
        if self.config.model_repository is not None:
            found = await asyncio.to_thread(repo.scan)  # directory listing: off the loop
            repo.add_scanned(found)  # on the loop: it owns the dicts, describe/prebuild need it
        return repo.index()

    async def load(self, name: str) -> None:
        """Load a model; returns once it is ready (joins a load in progress)."""
        await self.repository.load(check_name(name))

    async def unload(self, name: str) -> None:
        await self.repository.unload(check_name(name))

    # -- authentication and limits ------------------------------------------------------------
    def authorize(self, need: auth.Scope | None, authorization: str | None) -> auth.Denial | None:
        """The refusal for a caller presenting ``authorization`` on a route of scope ``need``
        (None: open), or None when it may proceed."""
        return auth.check(self.config.server.auth, self.tokens, need, authorization)

    def reserve_body(self, model: str, n: int) -> None:
        """Charge ``n`` body bytes to the budget shared by every transport, or refuse (503)."""
        if not self.budget.try_reserve(n):
            self.metrics.shed.inc(model=model, reason="body_budget")
            raise Overloaded("too many request bytes in flight; retry later", self.config.server.retry_after_s)

    def release_body(self, n: int) -> None:
        self.budget.release(n)

    # -- infer ----------------------------------------------------------------------------------
    def admit(self, name: str, version: str | None = None) -> ModelEntry:
        """The model, unless the server cannot take work now (draining, executor restarting)."""
        entry = self.model(name, version)
        if self.state.draining:
            raise ShuttingDown("server is shutting down")
        if not self.engine_healthy():
            raise Overloaded("the engine is restarting; retry later", self.config.server.retry_after_s)
        return entry

    def check_queue(self, entry: ModelEntry) -> None:
        """Refuse at once when no newcomer could get into the queue, whatever its priority."""
        if self.scheduler.hopeless(entry):
            self.metrics.shed.inc(model=entry.name, reason="queue_full")
            raise Overloaded(f"queue for model {entry.name!r} is full; retry later",
                             self.config.server.retry_after_s)

    async def infer(self, entry: ModelEntry, req: v2.InferRequest, outcome: Outcome, *,
                    deadline_s: float | None = None) -> Tensors:
        """Check a decoded request against the model, queue it, and wait for its outputs.

        ``deadline_s`` is the transport's own deadline (a gRPC deadline), combined with the
        request's ``timeout`` parameter: the earlier one wins. The wire's priority (0: the
        model's default) becomes a ``Priority`` here, once.
        """
        check_inputs(entry.config, entry.instance, req.inputs)
        check_outputs(entry.config, req.outputs)
        timeout_s = req.timeout_s
        if deadline_s is not None:
            timeout_s = deadline_s if timeout_s is None else min(timeout_s, deadline_s)
        priority = Priority.from_wire(req.priority, Priority(entry.config.default_priority))
        try:
            outputs, stats = await self.scheduler.submit(entry, req.inputs, priority=priority, timeout_s=timeout_s)
        except InferenceError as e:
            raise unknown_input(e, req.inputs) or e
        outcome.queue_ns = int(stats.queue_s * 1e9)
        outcome.compute_ns = int(stats.compute_s * 1e9)
        return outputs

    async def generate(self, name: str, prompt: Prompt, params: SamplingParams, *, priority: int = 0,
                       version: str | None = None) -> Generation:
        """Admit one text generation (as ``admit`` does an infer), tokenize and check its prompt.

        ``prompt`` is text (a completion) or chat messages (rendered by the model's chat
        template); ``params.max_tokens`` may be ``generation.UP_TO_CONTEXT``. ``priority`` is the
        wire's (0: the model's default, 1 most urgent), resolved here as for infer. The returned
        ``Generation``'s deltas run the sequence; the caller must ``aclose`` it. Errors before the
        first delta (not generative, context, overload, a failed load) come from the first
        ``anext``, so a front end can still answer them with a status.
        """
        entry = self.admit(name, version)
        if self._gen is None:
            raise RuntimeError("the data plane has not started (use it inside `async with`)")
        try:
            level = Priority.from_wire(priority, Priority(entry.config.default_priority))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return await self._gen.start(entry, prompt, params, level)

    @contextlib.contextmanager
    def accounted(self, name: str) -> Iterator[Outcome]:
        """Metrics and statistics of one infer request; success when the block ends normally."""
        t0 = time.monotonic_ns()
        outcome = Outcome()
        ok = False
        try:
            yield outcome
            ok = True
        finally:
            total_ns = time.monotonic_ns() - t0
            m = self.metrics
            if ok:
                m.count.inc(model=name, version="1")
                m.queue_us.inc((outcome.queue_ns or 0) // 1000, model=name, version="1")
                m.compute_us.inc(outcome.compute_ns // 1000, model=name, version="1")
            (m.success if ok else m.failure).inc(model=name, version="1")
            m.request_us.inc(total_ns // 1000, model=name, version="1")
            self.stats.record(name, ok, total_ns, outcome)

    def _executed(self, model: str, size: int, ns: int, cold: bool) -> None:
        """One successful model execution (a batch of ``size`` requests; ``cold``: a cold start's
        forward): Triton's exec count, the batch-size histogram and the statistics extension."""
        m = self.metrics
        m.exec_count.inc(model=model, version="1")
        m.batch_size.observe(size, model=model, version="1")
        if cold:
            m.cold_batch.set(size, model=model)
        self.stats.execution(model, size, ns)

    def _collect_pending(self) -> None:
        if self._repo is None or self._sched is None:
            return
        for name, e in self._repo.models.items():
            self.metrics.pending.set(self._sched.queued(name) + e.busy, model=name, version="1")


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
