"""One load's shards from plan to release, and the load's one way to fail.

The ledger is the only owner of a shard's state. Three threads move a shard along, each
through one method here, and every transition is checked (an illegal one is a bug: it raises)::

    planned --reading()--> reading --landed()--> landed --applied()--> applied --released--> released
     (plan)    [loop: a read it      [loop: its last    [executor: its     [loop: its reads'
               needs is admitted]     read landed; its   tensors are in     budget handed back
                                      apply is posted]   the skeleton]      to the Fetcher]

    planned | reading | landed | applied --fail()--> dropped     [any thread: the load failed]

``released`` and ``dropped`` are terminal. A shard with no read of its own (every byte came
with another shard's reads) lands straight from ``planned``. Events that arrive for a dropped
shard (an apply that finished as the load failed) are ignored: the failure won the race.

``fail`` is the load's single failure path, whoever notices first (a storage read, an apply,
a staging copy, the gated forward, a cancel): it keeps the first error, drops every shard not
yet released, wakes the forwards waiting at a gate, and hands the whole byte budget back.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Callable
from typing import Protocol

from protocols.errors import LoadError

from cicada_async.engine.executor import Executor


class ShardBudget(Protocol):
    """The fetch side's byte budget, as the ledger hands it back (``fetch.Fetcher``)."""

    def shard_applied(self, shard: int) -> None:
        """``shard`` is applied: the reads only it still needed free their budget."""
        ...

    def forfeit(self) -> None:
        """The load failed: admit nothing more and free every byte held."""
        ...


class ShardState(enum.Enum):
    PLANNED = "planned"
    READING = "reading"
    LANDED = "landed"
    APPLIED = "applied"
    RELEASED = "released"
    DROPPED = "dropped"


TERMINAL = frozenset({ShardState.RELEASED, ShardState.DROPPED})
# The states each state may be entered from.
_FROM: dict[ShardState, frozenset[ShardState]] = {
    ShardState.READING: frozenset({ShardState.PLANNED}),
    ShardState.LANDED: frozenset({ShardState.PLANNED, ShardState.READING}),
    ShardState.APPLIED: frozenset({ShardState.LANDED}),
    ShardState.RELEASED: frozenset({ShardState.APPLIED}),
}


class IllegalTransition(RuntimeError):
    """A shard moved in a way its life does not allow: a bug in the pipeline, never the data."""


class ShardLedger:
    """Each shard's state, the load's first error, and the hand-offs between the threads."""

    def __init__(self, executor: Executor, loop: asyncio.AbstractEventLoop) -> None:
        self.executor = executor
        self.loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop that runs the load
        self._lock = threading.Lock()  # every transition and the error, from any thread
        self.states: list[ShardState] = []
        self._applied = 0  # shards that reached applied (a gate's wait asks often)
        self.error: BaseException | None = None
        self.fetcher: ShardBudget | None = None  # set by the Fetcher that reads this load
        self._apply: Callable[[int], None] | None = None
        self._permute: Callable[[list[int]], list[int]] | None = None
        self._held: list[int] = []

    # wiring (loop thread) ----------------------------------------------------------------------
    def plan(self, count: int, apply: Callable[[int], None],
             permute: Callable[[list[int]], list[int]] | None = None) -> None:
        """The plan's ``count`` shards exist; ``apply(i)`` runs on the executor once ``i`` lands.

        ``permute`` (tests) holds every landed shard and posts the applies in its order.
        """
        if self.states:
            raise IllegalTransition("the shards of a load are planned once")
        self.states = [ShardState.PLANNED] * count
        self._apply = apply
        self._permute = permute
        if self.error is not None:  # failed before the plan: nothing will land
            self.states = [ShardState.DROPPED] * count

    # transitions ----------------------------------------------------------------------------------
    def reading(self, i: int) -> None:
        """Loop: a read that shard ``i`` needs was admitted (later ones change nothing)."""
        with self._lock:
            if self.states[i] is ShardState.PLANNED:
                self.states[i] = ShardState.READING

    def landed(self, i: int) -> None:
        """Loop: the last read shard ``i`` needs landed; its apply goes to the executor."""
        if not self._move(i, ShardState.LANDED):
            return
        if self._permute is None:
            self._post_apply(i)
            return
        self._held.append(i)
        if len(self._held) == len(self.states):
            for j in self._permute(list(self._held)):
                self._post_apply(j)

    def applied(self, i: int) -> None:
        """Executor: shard ``i``'s tensors are in the model; its budget goes back on the loop."""
        if self._move(i, ShardState.APPLIED):
            self.loop.call_soon_threadsafe(self._release, i)

    def _release(self, i: int) -> None:  # loop
        with self._lock:
            if self.states[i] is ShardState.DROPPED:
                return  # the failure handed every byte back already
        if self.fetcher is None:
            return  # the load is over (close): its fetcher and budget are gone with it
        self.fetcher.shard_applied(i)
        self._move(i, ShardState.RELEASED)

    def _move(self, i: int, to: ShardState) -> bool:
        """False when the shard was dropped meanwhile (the event lost the race with a failure)."""
        with self._lock:
            now = self.states[i]
            if now is ShardState.DROPPED:
                return False
            if now not in _FROM[to]:
                raise IllegalTransition(f"shard {i}: {now.value} -> {to.value}")
            self.states[i] = to
            self._applied += to is ShardState.APPLIED
            return True

    # queries (any thread; reads of a list under the GIL) -----------------------------------------
    def is_applied(self, i: int) -> bool:
        return self.states[i] in (ShardState.APPLIED, ShardState.RELEASED)

    def all_applied(self, shards: list[int]) -> bool:
        return all(self.is_applied(i) for i in shards)

    @property
    def remaining(self) -> int:
        """Shards never applied (dropped ones included)."""
        return len(self.states) - self._applied

    def count(self, state: ShardState) -> int:
        return sum(s is state for s in self.states)

    # work for the executor, and the one failure path ---------------------------------------------
    def post(self, fn: Callable[[], None]) -> None:
        """Work for this load on the executor (applies, staging copies); its failure fails the load."""
        self.executor.post_apply(fn, on_error=self._posted_failed)

    def _post_apply(self, i: int) -> None:
        apply = self._apply
        assert apply is not None
        self.post(lambda: apply(i))

    def _posted_failed(self, exc: BaseException) -> None:  # executor
        self.fail(exc if isinstance(exc, LoadError) else
                  LoadError(f"loading weights failed: {type(exc).__name__}: {exc}"))

    def fail(self, exc: BaseException) -> None:
        """The load failed with ``exc`` (any thread; the first error is the load's).

        Drops every shard not yet released, wakes forwards waiting at a gate (they raise the
        error), and on the loop stops the fetch and hands its whole byte budget back. Buffers
        are freed by the landing's ``aclose``, which the cold start always runs.
        """
        with self._lock:
            if self.error is None:
                self.error = exc
            self.states = [s if s in TERMINAL else ShardState.DROPPED for s in self.states]
        self.executor.wake()
        if threading.get_ident() == self._loop_thread:
            self._forfeit()
        else:
            self.loop.call_soon_threadsafe(self._forfeit)

    def close(self) -> None:
        """Loop, when the cold start ends: let go of the fetcher and the job's apply.

        They point back at the ledger; left in place, the cycle would keep the landing (its
        mapped files, its buffers) alive after the model is unloaded, until Python's cycle
        collector happens to run (measured: a soak's idle fds grew with every load).
        """
        self.fetcher = None
        self._apply = None
        self._permute = None

    def _forfeit(self) -> None:  # loop
        if self.fetcher is not None:
            self.fetcher.forfeit()
