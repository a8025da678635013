"""The first prefill of a cold model: every sequence that arrives while the model loads rides one
padded prefill through the gated model, layer by layer as the weights land.

A ``ColdBatch`` opens when a sequence arrives at a model whose load has its gates in and no batch
is open. Its prefill is one executor job: it waits (giving the turn away, running applies) until
the first module of the plan, the embedding, has its weights, and *then* closes the batch, so
every sequence that arrived by the time compute could start rides it; a later arrival opens the
next batch, which trails this one by a layer's compute. From there the forward is the gated
forward of the tensor path: each layer's pre-hook waits for that layer's shards, so layer k
computes while layers k+1.. are still on the wire, and the prefill costs about max(read, compute)
instead of read + compute. Decoding cannot start before the output head has run, i.e. before the
last layer landed: the first token is sampled at the end of this job.

The rows go through the model in forwards of at most ``PREFILL_CHUNK_TOKENS`` padded tokens
(``forwards_of``; the first forward passes the gates as the weights land, the next ones follow
it), so the activations a cold burst's prefill holds at once are those of one forward of at
most that many tokens (or of its longest prompt alone), not of the whole burst. In each forward, rows
are left-padded (right-aligned, as ``BatchCache`` keeps them) with an attention mask and
per-row position ids 0..n-1, so each row's logits and cache are those of the same prompt
prefilled alone, up to float reassociation in the padded matmuls (greedy tokens equal; the
tests compare with transformers). A batch of one row, or of rows of one length, passes no mask:
exactly what a warm prefill computes. Each row's cache is cut out of its forward's
(``kvcache.split_rows``; a forward of one row is its cache) and joins the running batch at the
loop's next decode step.

Admission as in the loop, over every rider of the load (all its batches) that the loop has not
admitted yet: at most ``max_sequences`` rows, and their padded worst case (rows x longest prompt
+ max_tokens x bytes per token) within the KV budget; a sequence that does not fit waits for
the load and is prefilled warm. Each row's cache is copied out of the batch's, which goes.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from cicada_async.engine.forward import all_cores
from cicada_async.engine.job import LoadJob
from cicada_async.engine.kvcache import new_cache, split_rows, worst_case_bytes
from cicada_async.engine.sampling import Choice, choose
from cicada_async.engine.sequence import GenSequence, LoopEngine
from protocols.errors import CicadaError, InferenceError
from protocols.serving import ModelOptions

if TYPE_CHECKING:  # transformers is imported on the executor, never at the engine's import
    from transformers.cache_utils import DynamicCache

PREFILL_CHUNK_TOKENS = 512
"""Padded tokens (rows x longest prompt) per forward of a cold batch. A forward holds one layer's
activations for all its tokens at once, outside the KV budget: one forward of 8 x 512 tokens of
llama-small held 160-190 MiB over its KV cache (VmHWM, in process; MLP intermediates of
8 x 512 x 2048 fp32 are 32 MiB each), and the served peak RSS of that burst was 1.41x weights +
KV + baseline (c0d5913). A burst of short prompts (8 x 32) stays one forward, whose matmuls
need the rows together; the bench's bound times both ways (``first_token_bound``)."""

Forward = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", torch.Tensor, "DynamicCache | None"], torch.Tensor]


@dataclass(frozen=True)
class Prefilled:
    """One row's outcome: its cache (its real columns) and its first token."""

    seq: GenSequence
    cache: DynamicCache
    choice: Choice


def forwards_of(lengths: list[int], chunk_tokens: int) -> list[list[int]]:
    """The cold batch's rows (indices into ``lengths``) grouped into forwards of at most
    ``chunk_tokens`` padded tokens each (rows x the group's longest prompt; a longer prompt goes
    alone), longest first: rows of one length share a forward, which then needs no mask."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= chunk_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _prefill_rows(forward: Forward, model: nn.Module, rows: list[GenSequence],
                  device: torch.device) -> tuple[list[DynamicCache], list[Choice]]:
    """One left-padded forward of ``rows``: each row's cache (its real columns) and first token."""
    lengths = [len(s.prompt) for s in rows]
    width = max(lengths)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for r, s in enumerate(rows):
        ids[r, width - lengths[r]:] = torch.tensor(s.prompt, dtype=torch.long)
        real[r, width - lengths[r]:] = 1
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    mask = None if min(lengths) == width else real.to(device)
    cache = new_cache()
    logits = forward(model, ids.to(device), mask, positions.to(device), cache)
    return split_rows(cache, lengths), choose(logits, [s.sampler for s in rows])


class ColdBatch:
    """The sequences riding one gated prefill of a loading model (see the module's docstring)."""

    def __init__(self, job: LoadJob, chunk_tokens: int | None = None) -> None:
        self.job = job
        self.chunk_tokens = PREFILL_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
        self._rows: list[GenSequence] = []
        self._lock = threading.Lock()  # join (loop) against close (executor)
        self._closed = False

    def join(self, seq: GenSequence) -> bool:
        """On the loop: True if ``seq`` rides this batch (it has not closed)."""
        with self._lock:
            if self._closed:
                return False
            self._rows.append(seq)
            return True

    def _close(self) -> list[GenSequence]:
        with self._lock:
            self._closed = True
            return [s for s in self._rows if s.live]

    def prefill(self, forward: Forward, device: torch.device, every_core: bool) -> list[Prefilled]:
        """The executor job: wait for the first layer, close, prefill the rows through the gates."""
        job = self.job
        first = next(iter(job.plan.modules), None)
        try:
            if first is not None and first in job.module_shards:
                job.wait_for(job.module_shards[first], first)  # the batch stays open meanwhile
        finally:
            rows = self._close()  # (failed: nobody joins a batch that will not run)
        if not rows:
            return []
        job.check()
        lengths = [len(s.prompt) for s in rows]
        out: list[Prefilled] = []
        start = job.timeline.now()
        with torch.inference_mode(), job.computing(), all_cores(every_core):
            for group in forwards_of(lengths, self.chunk_tokens):
                part = [rows[i] for i in group]
                caches, choices = _prefill_rows(forward, job.model, part, device)
                out += [Prefilled(s, c, ch) for s, c, ch in zip(part, caches, choices)]
        # One span per cold batch (the timeline's plot, and what tells a burst rode one prefill).
        job.timeline.add("prefill", f"{len(rows)} rows, {sum(lengths)} tokens", start)
        return out



class ColdRides:
    """The loop's side of cold batches: the open one, and a sequence's ride in it."""

    def __init__(self, engine: LoopEngine, options: ModelOptions) -> None:
        self._engine = engine
        self._options = options
        self._open: tuple[ColdBatch, asyncio.Future[list[Prefilled]]] | None = None
        # The load the riders belong to (weakly: the job, landing and tensor table must not
        # outlive the load here) and its riders, in any of its batches.
        self._job: weakref.ref[LoadJob] | None = None
        self._riders: list[GenSequence] = []

    def clear(self) -> None:
        self._open, self._job, self._riders = None, None, []

    def pending(self) -> list[GenSequence]:
        """Riders the loop has not admitted yet (prefilling, or holding their cache): the loop's
        admission counts them as rows, so nobody who came later takes their room."""
        return [s for s in self._riders if s.live and not s.admitted]

    def _room(self, job: LoadJob, seq: GenSequence, token_bytes: int) -> bool:
        """The loop's admission rule over every rider of the load that the loop has not admitted
        yet (all of its batches): at most ``max_sequences`` rows, their padded worst case within
        the KV budget. The loop admits them all once the model is ready (its batch is empty)."""
        if self._job is None or self._job() is not job:
            self._job, self._riders = weakref.ref(job), []
        after = self.pending() + [seq]
        if len(after) > self._options.max_sequences:
            return False
        if worst_case_bytes([s.final_len for s in after], token_bytes) > self._options.kv_cache_bytes:
            return False
        self._riders = after
        return True

    async def ride(self, job: LoadJob, seq: GenSequence, forward: Forward, token_bytes: int) -> None:
        """Prefill ``seq`` in the load's open batch, or in a new one: its cache and first token
        (``seq.cache``, ``seq.first``). Left unset when it could not ride (no room; the load
        failed: the loop's wait for the load says why); the warm path prefills it then."""
        if not self._room(job, seq, token_bytes):
            return
        cold = self._open
        if cold is None or cold[0].job is not job or not cold[0].join(seq):
            batch = ColdBatch(job)
            batch.join(seq)
            device = torch.device(self._options.device)
            every = self._engine.every_core_when_idle and device.type == "cpu"
            task = asyncio.ensure_future(self._engine.executor.run(
                batch.prefill, forward, device, every, priority=seq.priority))
            cold = self._open = (batch, task)
            # The job (landing, tensor table) must not outlive its batch here.
            task.add_done_callback(functools.partial(self._closed, cold))
        try:
            rows = await asyncio.shield(cold[1])
        except Exception as e:  # noqa: BLE001 - a failed load reaches the sequence through the load
            if job.error is not None:
                return
            if isinstance(e, CicadaError):
                raise
            raise InferenceError(f"prefill failed: {type(e).__name__}: {e}") from e
        for row in rows:
            if row.seq is seq:
                seq.cache, seq.first = row.cache, row.choice
                return

    def _closed(self, cold: tuple[ColdBatch, asyncio.Future[list[Prefilled]]], _task: object) -> None:
        if self._open is cold:
            self._open = None
        if not cold[1].cancelled():
            cold[1].exception()  # retrieved: its riders read it, if any still wait
