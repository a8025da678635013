"""One load's shared state: applying landed shards and the layer gates of the forward.

The ledger (ledger.py) posts each landed shard's apply; the executor thread applies it to the
skeleton and runs the forward, whose pre-hooks block (applying whatever lands meanwhile) until
a module's own shards are applied, so layer k computes while later layers are on the wire.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from protocols.errors import ConfigError, LoadError
from protocols.manifest import Plan, TensorEntry
from protocols.serving import ModelOptions

from cicada_async.engine.executor import PIECE_S, Executor
from cicada_async.engine.forward import Widening
from cicada_async.engine.landing import Landing
from cicada_async.engine.ledger import ShardLedger
from cicada_async.engine.modeldir import ModelSpec
from cicada_async.engine.reads import DEFAULT_READ_BYTES
from cicada_async.engine.skeleton import SkeletonIndex, materialize
from cicada_async.engine.timeline import Timeline

if TYPE_CHECKING:
    from cicada_async.engine.fetch import FetchScheduler


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
    # The gated forward runs on every usable core from its start, like the engine's warm
    # forwards (forward.Widening: one thread count for every forward, so the cold answer equals
    # the warm one bit for bit). The engine turns it on with every_core_when_idle (the
    # server's default: torch_threads unset).
    every_core_when_idle: bool = False
    # Files already in the page cache load as the stock loader does, without the pipeline
    # (engine/resident.py). Off for a bare ``cold_start``; a served model's (load_options) on.
    resident: bool = False


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


__all__ = ["LoadJob", "LoadOptions", "ModelOptions", "load_options"]  # ModelOptions: protocols.serving's


def load_options(options: ModelOptions, read_bytes: int, load_timeout_s: float,
                 every_core: bool = False) -> LoadOptions:
    """A served model's options (plain config data) checked and turned into a load's torch terms."""
    if options.dtype is not None and options.dtype not in _DTYPES:
        raise ConfigError(f"dtype {options.dtype!r} is not one of {', '.join(_DTYPES)}")
    try:
        device = torch.device(options.device)
    except RuntimeError:
        raise ConfigError(f"device {options.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {options.device!r} asked for, but CUDA is not available")
    if str(device) == "cuda":  # no index (torch's stubs type ``index`` as never None)
        # "cuda" != "cuda:0": an index-less device would make every tensor look misplaced.
        device = torch.device("cuda", torch.cuda.current_device())
    return LoadOptions(
        dtype=_DTYPES[options.dtype] if options.dtype else None, device=device,
        read_bytes=read_bytes, load_timeout_s=load_timeout_s, every_core_when_idle=every_core,
        resident=True,  # a served model's files in the page cache skip the pipeline
    )


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
        ledger: ShardLedger,
    ) -> None:
        self.spec = spec
        self.model = model
        self.index = index
        self.plan = plan
        self.tensors = tensors
        self.landing = landing
        self.events: dict[int, torch.cuda.Event] = {}
        self.options = options
        self.executor = executor
        self.timeline = timeline
        self.ledger = ledger  # each shard's state and the load's error
        self.deadline = time.monotonic() + options.load_timeout_s
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._all_in = False  # apply_all ran: every tensor is in, outside the ledger
        # CUDA: this load computes on its own stream, ordered only after its own shards' copy
        # events, so loads of different models never queue behind each other on the device.
        self.stream = torch.cuda.Stream(options.device) if options.device.type == "cuda" else None  # type: ignore[no-untyped-call]  # unannotated in torch itself
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

    @property
    def error(self) -> BaseException | None:
        """The load's first error (``ShardLedger.fail``), or None."""
        return self.ledger.error

    # executor thread ---------------------------------------------------------------------------
    def apply(self, i: int) -> None:
        """Shard ``i`` landed (posted by the ledger): its tensors go into the skeleton."""
        if self.error is not None:
            return
        shard = self.plan.shards[i]
        start = self.timeline.now()
        try:
            with self.computing():  # CUDA: converted tensors are recorded on this load's stream
                self._make_tensors(i)
            ev = self.landing.shard_done()
            if ev is not None:
                self.events[i] = ev
        except Exception as e:  # noqa: BLE001 - any apply failure fails the whole load
            self.ledger.fail(LoadError(f"applying weights of {shard.module or 'the model'}: {e}"))
            return
        self.timeline.add("apply", shard.module, start, nbytes=shard.nbytes)
        self.ledger.applied(i)

    def apply_all(self) -> None:
        """Every shard in one pass, no ledger (the resident path: every byte is in memory).

        Yield points between shards: a large model's pass is one executor turn otherwise
        (issue 28 item 4)."""
        start = self.timeline.now()
        for i in range(len(self.plan.shards)):
            self._make_tensors(i)
            self.executor.yield_turn(PIECE_S)
        self._all_in = True
        self.timeline.add("apply", "<all>", start, nbytes=sum(s.nbytes for s in self.plan.shards))

    def _make_tensors(self, i: int) -> None:
        for name in self.plan.shards[i].tensors:
            slot = self.index.slots[name]
            # With a serving dtype, each tensor converts to its skeleton slot's dtype (fp32 for
            # keep-in-fp32 modules); without one, the checkpoint's dtype is served.
            dtype = slot.dtype if self.options.dtype is not None else None
            value = self.landing.make_tensor(self.tensors[name], self.plan, i, dtype)
            materialize(slot, value)

    def wait_for(self, shards: list[int], what: str) -> None:
        if (self._all_in or self.ledger.all_applied(shards)) and self.error is None:
            self._device_wait(shards)
            return
        start = self.timeline.now()
        self.executor.wait_until(
            lambda: self.error is not None or self.ledger.all_applied(shards), self.deadline
        )
        self.timeline.add("wait", what, start)
        if self.error is not None:
            raise self.error
        self._device_wait(shards)

    def _device_wait(self, shards: list[int]) -> None:
        # On CUDA the shard's copies may still be queued: compute waits on the device for its
        # own copies only, without blocking the host. An event is waited for once, then
        # dropped: later forwards through the gate are ordered after it because every forward
        # of this load computes on one stream (computing()), and remove_gates orders the warm
        # forwards' stream after the load's. Code that switches streams inside a forward
        # would need the events kept.
        if self.events:
            stream = torch.cuda.current_stream(self.options.device)
            for i in shards:
                ev = self.events.pop(i, None)
                if ev is not None:
                    stream.wait_event(ev)

    def wait_all(self) -> None:
        self.executor.wait_until(lambda: self.error is not None or self.ledger.remaining == 0, self.deadline)
        if self.error is not None:
            raise self.error

    def install_gates(self) -> None:
        modules = dict(self.model.named_modules())
        starts: dict[str, float] = {}

        def gate(name: str, shards: list[int]) -> Callable[..., None]:
            def pre(_m: nn.Module, _a: Any) -> None:
                self.executor.yield_turn(PIECE_S)  # a layer boundary: more urgent work goes first
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

    @contextlib.contextmanager
    def widening(self, scheduler: FetchScheduler | None) -> Iterator[None]:
        """The gated forward's torch threads: every usable core from its first layer to its last,
        like every warm forward (forward.Widening: one count, so the cold answer is the warm
        one, bit for bit); None (``scheduler`` not given) keeps the thread's setting."""
        with Widening(scheduler is not None):
            yield

    def computing(self) -> Any:
        """Context for a forward on this load's model while it loads (its own CUDA stream)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def remove_gates(self) -> None:
        """Gates off; layer boundaries stay points where a warm forward yields to urgent work."""
        if self.stream is not None:
            # Warm forwards run on the worker's default stream: after everything this load did.
            torch.cuda.current_stream(self.options.device).wait_stream(self.stream)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        modules = dict(self.model.named_modules())
        executor = self.executor

        def yield_point(_m: nn.Module, _a: Any) -> None:
            executor.yield_turn(PIECE_S)

        for name in self.module_shards:
            if name:
                self._hooks.append(modules[name].register_forward_pre_hook(yield_point))
