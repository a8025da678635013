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

Rows are left-padded (right-aligned, as ``BatchCache`` keeps them) with an attention mask and
per-row position ids 0..n-1, so each row's logits and cache are those of the same prompt
prefilled alone, up to float reassociation in the padded matmuls (greedy tokens equal; the
tests compare with transformers). A batch of one row, or of rows of one length, passes no mask:
exactly what a warm prefill computes. Each row's cache is cut out of the batch's
(``kvcache.split_rows``) and joins the running batch at the loop's next decode step.

Admission as in the loop: at most ``max_sequences`` rows, and the rows' padded worst case
(rows x longest prompt + max_tokens x bytes per token) within the KV budget; a sequence that
does not fit waits for the load and is prefilled warm.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from cicada_async.engine.forward import all_cores
from cicada_async.engine.job import LoadJob
from cicada_async.engine.kvcache import new_cache, split_rows
from cicada_async.engine.sampling import Choice, choose
from cicada_async.engine.sequence import GenSequence

if TYPE_CHECKING:  # transformers is imported on the executor, never at the engine's import
    from transformers.cache_utils import DynamicCache

Forward = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", torch.Tensor, "DynamicCache | None"], torch.Tensor]


@dataclass(frozen=True)
class Prefilled:
    """One row's outcome: its cache (its real columns) and its first token."""

    seq: GenSequence
    cache: DynamicCache
    choice: Choice


class ColdBatch:
    """The sequences riding one gated prefill of a loading model (see the module's docstring)."""

    def __init__(self, job: LoadJob, *, max_rows: int, kv_budget: int, token_bytes: int) -> None:
        self.job = job
        self._max_rows = max_rows
        self._kv_budget = kv_budget
        self._token_bytes = token_bytes
        self._rows: list[GenSequence] = []
        self._lock = threading.Lock()  # join (loop) against close (executor)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def join(self, seq: GenSequence) -> bool:
        """On the loop: True if ``seq`` rides this batch (open, a row free, the budget holds)."""
        with self._lock:
            if self._closed or len(self._rows) >= self._max_rows:
                return False
            after = [*self._rows, seq]
            if len(after) * max(s.final_len for s in after) * self._token_bytes > self._kv_budget:
                return False
            self._rows.append(seq)
            return True

    def _close(self) -> list[GenSequence]:
        with self._lock:
            self._closed = True
            return [s for s in self._rows if s.live]

    def close_empty(self) -> None:
        """The job never ran (the load failed first): nobody joins any more."""
        with self._lock:
            self._closed = True

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
        width = max(lengths)
        start = job.timeline.now()
        with torch.inference_mode(), job.computing(), all_cores(every_core):
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            real = torch.zeros((len(rows), width), dtype=torch.long)
            for r, s in enumerate(rows):
                ids[r, width - lengths[r]:] = torch.tensor(s.prompt, dtype=torch.long)
                real[r, width - lengths[r]:] = 1
            positions = (real.cumsum(-1) - 1).clamp(min=0)
            mask = None if min(lengths) == width else real.to(device)
            cache = new_cache()
            logits = forward(job.model, ids.to(device), mask, positions.to(device), cache)
            choices = choose(logits, [s.sampler for s in rows])
            caches = split_rows(cache, lengths)
        # One span per cold batch (the timeline's plot, and what tells a burst rode one prefill).
        job.timeline.add("prefill", f"{len(rows)} rows, {sum(lengths)} tokens", start)
        return [Prefilled(s, c, ch) for s, c, ch in zip(rows, caches, choices)]

