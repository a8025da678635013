"""Choosing each sequence's next token from a batch's logits (runs on the executor thread).

Per row, in the order the OpenAI API and transformers apply them: presence and frequency
penalties over the tokens generated so far, then temperature, top-k and top-p, then a draw from
the row's own ``torch.Generator``. ``temperature == 0`` is greedy: ``argmax`` of the (penalized)
logits, exactly what transformers' ``generate(do_sample=False)`` takes, first index on ties.

Logprobs are ``log_softmax`` of the model's *raw* logits, before penalties, temperature and the
top-k/top-p cut (what vLLM reports by default, ``logprobs_mode="raw_logprobs"``): the model's own
belief, comparable across requests whatever their sampling settings, and never ``-inf`` for a
token the cut removed. The sampled token's logprob is reported even when it is not in the top k.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from protocols.generation import SamplingParams


@dataclass
class RowSampler:
    """One sequence's sampling state: its parameters, generator and generated-token counts."""

    params: SamplingParams
    device: torch.device
    generator: torch.Generator | None = None
    counts: Counter[int] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.params.temperature > 0:
            # A seed makes the draws reproducible, alone or in any batch: each row consumes only
            # its own generator. Without one, a fresh seed from the OS.
            seed = self.params.seed if self.params.seed is not None else random.SystemRandom().getrandbits(63)
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(seed)

    def add(self, token: int) -> None:
        self.counts[token] += 1


@dataclass(frozen=True, slots=True)
class Choice:
    """One row's chosen token, and its raw logprob and top alternatives when asked for."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def choose(logits: torch.Tensor, rows: list[RowSampler]) -> list[Choice]:
    """The next token of every row of ``logits`` [B, V] (B == len(rows))."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} for {len(rows)} rows")
    logits = logits.float()  # bf16/fp16 models: penalties, softmax and logprobs in fp32
    greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0 and not _penalized(r)]
    tokens: list[int] = [0] * len(rows)
    if greedy:
        # The common case in one call: the rows' argmax without copying them out one by one.
        picked = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < len(rows) else logits.argmax(dim=-1).tolist()
        for i, t in zip(greedy, picked):
            tokens[i] = int(t)
    todo = set(range(len(rows))) - set(greedy)
    for i in sorted(todo):
        tokens[i] = _choose_row(logits[i], rows[i])
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out = [Choice(t) for t in tokens]
    if wanted:
        logprobs = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            k = rows[i].params.logprobs or 0
            lp = logprobs[j]
            top: tuple[tuple[int, float], ...] = ()
            if k:
                vals, ids = torch.topk(lp, min(k, lp.shape[-1]))
                top = tuple(zip((int(x) for x in ids.tolist()), (float(v) for v in vals.tolist())))
            out[i] = Choice(tokens[i], float(lp[tokens[i]]), top)
    for r, t in zip(rows, tokens):
        r.add(t)
    return out


def _penalized(row: RowSampler) -> bool:
    p = row.params
    return bool(row.counts) and (p.presence_penalty != 0 or p.frequency_penalty != 0)


def penalize(logits: torch.Tensor, row: RowSampler) -> torch.Tensor:
    """OpenAI's penalties: ``presence`` once per token generated so far, ``frequency`` times its
    count, subtracted from the logits (a new tensor; the prompt's tokens do not count)."""
    p = row.params
    if not _penalized(row):
        return logits
    ids = torch.tensor(list(row.counts.keys()), device=logits.device)
    counts = torch.tensor(list(row.counts.values()), device=logits.device, dtype=logits.dtype)
    out = logits.clone()
    out[ids] -= p.presence_penalty + p.frequency_penalty * counts
    return out


def filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the smallest set of most likely tokens whose
    probabilities reach ``top_p``; the most likely token always stays): the rest at ``-inf``."""
    scores = logits / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # A token is cut when the tokens more likely than it already reach top_p.
        before = torch.cumsum(probs, dim=-1) - probs
        cut = before >= params.top_p
        cut[0] = False
        scores = scores.masked_fill(torch.zeros_like(cut).scatter(0, order, cut), float("-inf"))
    return scores


def _choose_row(logits: torch.Tensor, row: RowSampler) -> int:
    scores = penalize(logits, row)
    if row.params.temperature == 0:
        return int(scores.argmax())
    probs = torch.softmax(filtered(scores, row.params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=row.generator).item())
