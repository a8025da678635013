"""Dynamic batching: which waiting requests run together, one batched input, outputs split back.

Triton's dynamic batcher, within the scheduler's one warm slot (docs/service.md, "Dynamic
batching"): a batch is the most urgent waiting request and the most urgent requests
compatible with it, up to ``max_batch_size`` rows. Requests are compatible when their inputs
have the same names and datatypes and agree in every dimension but the first; token inputs
(integer ``[batch, seq]``) of different lengths are compatible too when the model may be
padded (``attention_mask`` in its forward and a ``pad_token_id`` in its config). The batch
runs at once when it is full or of a preferred size; otherwise it may wait up to
``max_queue_delay_us`` for more, but only while the model's waiting requests are all of one
priority: a more urgent request never waits to fill a batch.

The batching decisions run on the event loop. Building a batched input copies every member's
tensors (up to 32 bodies of 64 MiB): a warm batch over ``OFF_LOOP_BYTES`` is built in a worker
thread; a cold start's batch is built when its gated forward starts, on the loop, by the
engine's call of ``inputs()``.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from cicada_async.service.config import ModelConfig
from protocols.errors import InferenceError
from protocols.serving import Priority, ServedModel, Tensors

MASK = "attention_mask"
OFF_LOOP_BYTES = 1 << 20  # a batch's inputs above this are concatenated in a worker thread
Result = dict[str, torch.Tensor] | BaseException


class Waiting(Protocol):
    """What the batcher needs of a queued request (the scheduler's ``Pending``)."""

    inputs: dict[str, torch.Tensor]
    enqueued: float

    @property
    def priority(self) -> Priority: ...


W = TypeVar("W", bound=Waiting)  # the caller's own request type, handed back as it was given


@dataclass(frozen=True)
class Policy:
    """A model's batching settings, with what the engine says about padding it."""

    max_rows: int
    preferred: tuple[int, ...] = ()
    delay_s: float = 0.0
    pad: int | None = None  # None: token inputs of different lengths never batch together
    instance: ServedModel | None = None  # where ``pad_token_id`` is read, when it is used

    @property
    def pad_token_id(self) -> int | None:
        # Read from the instance at each use, not when the policy is made: the engine learns
        # the pad token in the background (describe) while the first requests' cold start
        # runs, and a policy made before that (the cold start's, which its queued requests
        # join by) would never pad: a burst of different lengths ran as one forward each.
        return self.pad if self.instance is None else self.instance.pad_token_id

    @classmethod
    def of(cls, max_batch_size: int, preferred: Sequence[int], delay_us: int, pad_token_id: int | None,
           instance: ServedModel | None = None) -> Policy | None:
        if max_batch_size <= 0:
            return None
        return cls(max_batch_size, tuple(sorted(set(preferred))), delay_us / 1e6, pad_token_id, instance)


def policy_for(config: ModelConfig, instance: ServedModel) -> Policy | None:
    """A model's policy from its ModelConfig and what its engine instance knows (None: off)."""
    return Policy.of(config.max_batch_size, config.preferred_batch_sizes, config.max_queue_delay_us,
                     instance.pad_token_id, instance)


class Delays:
    """One wake-up per model whose batch is waiting out its delay (loop timers)."""

    def __init__(self, kick: Callable[[], None]) -> None:
        self._kick = kick
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def wake_at(self, model: str, when: float) -> None:
        timer = self._timers.get(model)
        if timer is not None and timer.when() == when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[model] = asyncio.get_running_loop().call_at(when, self._kick)


@dataclass
class Layout:
    """How a batched input was put together, to split its outputs back."""

    rows: list[int]
    lengths: list[int] | None = None  # each member's sequence length, when padding was needed
    padded_to: int = 0


def rows(inputs: dict[str, torch.Tensor]) -> int | None:
    """The request's batch size (its inputs' common first dimension); None: it cannot batch."""
    firsts = {t.shape[0] if t.dim() else None for t in inputs.values()}
    if len(firsts) != 1:
        return None
    (n,) = firsts
    return n if n else None


def _token(t: torch.Tensor) -> bool:
    return t.dim() == 2 and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def key(inputs: dict[str, torch.Tensor], policy: Policy) -> Hashable | None:
    """Requests with equal keys can run in one batch; None: this one runs alone."""
    if not inputs or rows(inputs) is None:
        return None
    pad = policy.pad_token_id is not None
    if pad and len({t.shape[1] for t in inputs.values() if _token(t)}) > 1:
        return None  # token inputs of one request disagree on the length: no common padding
    # Names are sorted: the same inputs sent in another order are the same batch.
    return tuple(sorted((n, str(t.dtype), ("tokens",) if pad and _token(t) else tuple(t.shape[1:]))
                        for n, t in inputs.items()))


def gather(head: W, others: Iterable[W], policy: Policy) -> list[W]:
    """``head`` and the requests of ``others`` (most urgent first) that fit one batch with it."""
    k = key(head.inputs, policy)
    total = rows(head.inputs) or 0
    members = [head]
    if k is None:
        return members
    for w in others:
        if total >= policy.max_rows:
            break
        n = rows(w.inputs)
        if n is not None and total + n <= policy.max_rows and key(w.inputs, policy) == k:
            members.append(w)
            total += n
    return members


def decide(members: list[W], policy: Policy, now: float, one_priority: bool) -> tuple[list[W], float | None]:
    """``(members to run now, None)``, or ``([], when to look again)`` while the batch waits.

    Full batches and preferred sizes run at once (the longest prefix of the most urgent
    members that makes a preferred size); a smaller batch waits out the delay, counted from
    its oldest member's arrival, only while ``one_priority`` (every request waiting for the
    model has the same priority).
    """
    sizes = [rows(m.inputs) or 0 for m in members]
    if sum(sizes) >= policy.max_rows or len(members) == 1 and key(members[0].inputs, policy) is None:
        return members, None
    if policy.preferred:
        total, best = 0, 0
        for i, n in enumerate(sizes):
            total += n
            if total in policy.preferred:
                best = i + 1
        if best:
            return members[:best], None
    if policy.delay_s > 0 and one_priority:
        until = min(m.enqueued for m in members) + policy.delay_s
        if now < until:
            return [], until
    return members, None


def next_batch(waiting: list[W], policy: Policy, now: float) -> tuple[list[W], float | None]:
    """From a model's waiting requests (most urgent first): ``decide`` on the batch around the head."""
    return decide(gather(waiting[0], waiting[1:], policy), policy, now, waiting[0].priority == waiting[-1].priority)


def concat(inputs: list[dict[str, torch.Tensor]], policy: Policy) -> tuple[dict[str, torch.Tensor], Layout]:
    """One batched input from compatible requests' inputs (``key`` equal), in their order."""
    layout = Layout([rows(x) or 0 for x in inputs])
    lengths = [next((t.shape[1] for t in x.values() if _token(t)), 0) for x in inputs]
    pad = policy.pad_token_id is not None and len(set(lengths)) > 1
    if not pad:
        return {n: torch.cat([x[n] for x in inputs]) for n in inputs[0]}, layout
    layout.lengths, layout.padded_to = lengths, max(lengths)
    names = list(inputs[0])
    if MASK not in names:
        names.append(MASK)  # padded positions must be masked: the unpadded requests' mask is all ones
    out: dict[str, torch.Tensor] = {}
    for n in names:
        parts = []
        for x, length, r in zip(inputs, lengths, layout.rows):
            t = x.get(n)
            if t is None:
                t = torch.ones(r, length, dtype=torch.int64)
            if _token(t) and length < layout.padded_to:
                # The pad token for the ids; 0 (masked out, segment 0, position 0) for the others.
                value = policy.pad_token_id if n == "input_ids" else 0
                t = torch.nn.functional.pad(t, (0, layout.padded_to - length), value=value)
            parts.append(t)
        out[n] = torch.cat(parts)
    return out, layout


Axes = dict[str, tuple[int, ...]]  # per output, the axes (after the batch's) that follow the sequence length
_seq_axes: weakref.WeakKeyDictionary[ServedModel, Axes] = weakref.WeakKeyDictionary()


async def seq_axes(instance: ServedModel, sample: dict[str, torch.Tensor], priority: Priority) -> Axes:
    """Which axes of each output follow the input's sequence length, found once per model.

    Shapes alone cannot say it: a ``[batch, seq]`` output (question answering's
    ``start_logits``) looks like ``[batch, features]``, and a ``[batch, heads, ...]`` one whose
    heads happen to equal the padded length looks like ``[batch, seq, ...]``. Two one-row
    forwards of the same request cut to 1 and to 2 tokens tell: an axis of size 1 in the first
    and 2 in the second is a sequence axis. ``sample``: one request's token inputs, at least 2
    tokens long.
    """
    known = _seq_axes.get(instance)
    if known is not None:
        return known
    short, longer = ({n: t[:1, :k] if _token(t) else t[:1] for n, t in sample.items()} for k in (1, 2))
    a = await instance.infer(short, priority=priority)
    b = await instance.infer(longer, priority=priority)
    axes = {n: tuple(i for i in range(1, t.dim()) if t.shape[i] == 1 and b[n].shape[i] == 2)
            for n, t in a.items() if n in b and b[n].dim() == t.dim()}
    _seq_axes[instance] = axes
    return axes


def split(outputs: dict[str, torch.Tensor], layout: Layout, axes: Axes | None = None) -> list[dict[str, torch.Tensor]]:
    """Each member's share of a batched forward's outputs (rows, and its own length if padded:
    the ``axes`` of each output that follow the sequence, see ``seq_axes``).

    Raises InferenceError when an output has no batch dimension to split along.
    """
    total = sum(layout.rows)
    for name, t in outputs.items():
        if t.dim() == 0 or t.shape[0] != total:
            raise InferenceError(f"output {name!r} of shape {list(t.shape)} has no batch dimension of {total}; "
                                 "this model cannot batch (set max_batch_size = 0)")
    parts: list[dict[str, torch.Tensor]] = []
    start = 0
    for i, n in enumerate(layout.rows):
        part = {}
        for name, t in outputs.items():
            piece = t[start:start + n]
            if layout.lengths is not None:
                # Every sequence axis loses the padding ([batch, seq] logits, [batch, seq, hidden]
                # states, [batch, heads, seq, seq] attentions); other axes are kept whole.
                for axis in (axes or {}).get(name, ()):
                    if t.shape[axis] == layout.padded_to:
                        piece = piece.narrow(axis, 0, layout.lengths[i])
                piece = piece.contiguous()
            part[name] = piece
        parts.append(part)
        start += n
    return parts


async def run(instance: ServedModel, batch: Sequence[Waiting], policy: Policy | None, *, join: Callable[[], None] | None,
              ready: Callable[[], bool], on_batch: Callable[[int, int], None]) -> list[Result]:
    """One forward for the whole batch, split back per member (one by one if it fails as a whole).

    ``instance`` is the engine's model. ``join`` (a cold start) is called when the
    forward starts, on the loop, and may append the requests that queued meanwhile to ``batch``.
    ``on_batch`` is told the size and nanoseconds of every successful execution.
    """
    t0 = time.monotonic_ns()
    if policy is None:
        out = await instance.infer(batch[0].inputs, priority=batch[0].priority)
        on_batch(1, time.monotonic_ns() - t0)
        return [out]
    layout: Layout | None = None

    def inputs() -> Tensors:
        nonlocal layout
        if join is not None:
            join()
        if len(batch) == 1:
            return batch[0].inputs
        merged, layout = concat([p.inputs for p in batch], policy)
        return merged

    try:
        if join is None and len(batch) > 1:
            # Nothing can join a warm batch: build it now, off the loop when it is large.
            members = [p.inputs for p in batch]
            big = sum(t.nbytes for x in members for t in x.values()) > OFF_LOOP_BYTES
            merged, layout = await asyncio.to_thread(concat, members, policy) if big else concat(members, policy)
            out = await instance.infer(merged, priority=batch[0].priority)
        else:
            out = await instance.infer(inputs, priority=batch[0].priority)
        axes = None
        if layout is not None and layout.lengths is not None:
            longest = batch[layout.lengths.index(layout.padded_to)].inputs
            axes = await seq_axes(instance, longest, batch[0].priority)
        parts: list[Result] = [out] if layout is None else list(split(out, layout, axes))
    except InferenceError:
        if len(batch) == 1 or not ready():
            raise
        # One bad request (a token id out of range) must not fail the requests batched with
        # it: each runs alone and gets its own answer.
        return [await _alone(instance, w, on_batch) for w in batch]
    on_batch(len(batch), time.monotonic_ns() - t0)
    return parts


async def _alone(instance: ServedModel, w: Waiting, on_batch: Callable[[int, int], None]) -> Result:
    t0 = time.monotonic_ns()
    try:
        out = await instance.infer(w.inputs, priority=w.priority)
    except Exception as e:  # noqa: BLE001 - this request's own error, answered to it
        return e
    on_batch(1, time.monotonic_ns() - t0)
    return dict(out)
