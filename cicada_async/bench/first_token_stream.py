"""Per-token arrival stamps of one streamed completion, and the decode steps they give
(``cicada bench first-token``, issue 26: "tokens after the first are as fast as warm decoding
from the second decode step on").

The client is ``generate.stream_once``'s lean one (http.client, one thread per stream, a
prefix test per line, JSON parsed only for the usage and error events), so that the clock of
the first token is unchanged, asked to return every completion chunk's arrival stamp. A chunk is one token when the stream's chunk count equals the usage's
``completion_tokens``: the server may hold back bytes of an incomplete UTF-8 character and send
two tokens in one chunk, and such a stream's gaps are not decode steps, so ``steps_of`` gives
none for it (it is counted as ``merged``).

Decode step k (k >= 1) is the gap between token k and token k + 1 as the client saw them: step 1
follows the first token. A cold request's step 1 may still carry the end of the load (the gates
coming off, the first decode of a fresh KV cache); the target is about step 2 on. A cold burst's
requests are prefilled as one batch and decode together from step 1 to their common end.

The warm reference cannot take every step of a warm burst: a warm server prefills each new
request alone and merges it (``engine/kvcache.py``), so the first requests' early steps hold
the later ones' prefills, and the last ones' final steps run in a batch already shrinking.
``full_batch_steps`` keeps the steps that lie between the burst's last first token and its
first last token: every request in the batch, none prefilling. The warm burst asks for more
tokens (``warm_tokens``) so that this window holds several steps.
"""

from __future__ import annotations

import statistics
from typing import Any

from cicada_async.bench.generate import stream_once


def stream_stamped(port: int, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed ``/v1/completions``: ``generate.stream_once``'s record plus ``stamps``
    (perf_counter at each completion chunk's arrival)."""
    return stream_once(port, model, prompt, max_tokens, keep_stamps=True)


def warm_tokens(max_tokens: int, burst: int) -> int:
    """Tokens per request of the warm reference: enough for full-batch steps after a staggered
    start (each of the burst's prefills may take a step's place)."""
    return max(max_tokens, 8) + 4 * (burst - 1)


def full_batch_steps(streams: list[dict[str, Any]]) -> list[float]:
    """The steps of every request that begin at or after the burst's last first token and end
    by its first last token (one request: all of its steps)."""
    stamped = [s.get("stamps") or [] for s in streams]
    if not all(stamped):
        return []
    start, end = max(s[0] for s in stamped), min(s[-1] for s in stamped)
    return [b - a for s in streams if steps_of(s) is not None
            for a, b in zip(s["stamps"], s["stamps"][1:]) if a >= start and b <= end]


def token_offsets(stream: dict[str, Any]) -> list[float]:
    """Each chunk's arrival, seconds after the request was sent."""
    return [t - stream["t0"] for t in stream.get("stamps", [])]


def steps_of(stream: dict[str, Any]) -> list[float] | None:
    """The decode steps (step k at index k - 1), or None when a chunk carried several tokens."""
    stamps = stream.get("stamps") or []
    if len(stamps) != stream.get("tokens"):
        return None
    return [b - a for a, b in zip(stamps, stamps[1:])]


def decode_record(streams: list[dict[str, Any]]) -> dict[str, Any]:
    """Per request: arrival offsets and steps; ``merged``: requests whose chunks were not tokens."""
    steps = [steps_of(s) for s in streams]
    return {"token_at_s": [token_offsets(s) for s in streams],
            "decode_steps_s": [x for x in steps if x is not None],
            "full_batch_steps_s": full_batch_steps(streams),
            "merged": sum(x is None for x in steps)}


def steps_from(records: list[dict[str, Any]], first_step: int) -> list[float]:
    """Every step k >= ``first_step`` of every request of every record (``decode_record``)."""
    return [t for rec in records for steps in rec.get("decode_steps_s", []) for t in steps[first_step - 1:]]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
