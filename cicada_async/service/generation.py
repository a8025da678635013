"""Text generation in the data plane: the typed core under the OpenAI and Triton generate routes.

``DataPlane.generate`` admits the request (model, drain, engine health) and hands it here:
the prompt becomes token ids with the model's own tokenizer (its chat template for messages),
the context is checked (and ``max_tokens`` defaulted to what the context leaves), a cold model's
load is made room for and tracked by the repository (memory budget, cold-start metrics) as a
V2 cold start is, and the engine's deltas are passed on with their metrics counted: time to
first token, inter-token latency, tokens in and out, end-to-end latency and the outcome.

A ``Generation`` is an async iterator of ``GenerationDelta``; whoever holds one must
``aclose`` it (the front ends do, in a ``finally``), which closes the engine's iterator and
frees the sequence's KV cache at once. No transport here (``tests/service/test_dataplane.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, replace

from cicada_async.service.limits import offload_codec
from cicada_async.service.metrics import Metrics
from cicada_async.service.repository import ModelEntry, Repository
from protocols.errors import BadRequest, Overloaded
from protocols.generation import ChatMessage, GenerationDelta, PromptCodec, SamplingParams
from protocols.serving import Priority

Prompt = str | Sequence[ChatMessage]
UP_TO_CONTEXT = 0
"""``SamplingParams.max_tokens`` of a request that named none: what the context leaves after
the prompt (OpenAI's default). Never reaches the engine: ``start`` replaces it."""
# Tokenizing is CPU work on the caller's thread: a long prompt (the body limit allows about a
# megabyte of text, ~250k tokens) is tokenized on the codec threads, not on the loop.
OFFLOAD_CHARS = 16 * 1024


class BadParameter(BadRequest):
    """A request field out of range for this model; ``param`` names it (the OpenAI error's)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Generation:
    """One admitted sequence: its prompt's size and the deltas to come (iterate, then ``aclose``)."""

    model: str
    prompt_tokens: int
    max_tokens: int
    context_length: int
    deltas: AsyncGenerator[GenerationDelta, None]

    def __aiter__(self) -> AsyncIterator[GenerationDelta]:
        return self.deltas

    async def aclose(self) -> None:
        """End the sequence now (a no-op once it finished): the engine frees its KV cache."""
        await self.deltas.aclose()


async def prompt_ids(codec: PromptCodec, prompt: Prompt) -> list[int]:
    """The prompt's token ids: text as the tokenizer encodes it, messages through the chat template."""
    if isinstance(prompt, str):
        text = prompt
        if len(text) > OFFLOAD_CHARS:
            return await offload_codec(lambda: codec.encode(text))
        return codec.encode(text)
    messages = list(prompt)
    if not codec.chat_ready:
        # The first chat builds the template's tokenizer: transformers, whose import may still be
        # in flight (seconds) in a fresh process. Never on the loop; not on the codec threads,
        # which decode infer bodies meanwhile.
        await asyncio.to_thread(codec.prepare_chat)
    if sum(len(m.content) for m in messages) > OFFLOAD_CHARS:
        return await offload_codec(lambda: codec.render_chat(messages))
    return codec.render_chat(messages)


def fit_context(n_prompt: int, context: int, params: SamplingParams, chat: bool) -> SamplingParams:
    """``params`` with ``max_tokens`` resolved against the context, or ``BadParameter``."""
    where = "messages" if chat else "prompt"
    if n_prompt == 0:
        raise BadParameter("the prompt is empty: it has no tokens to generate from", where)
    if n_prompt >= context:
        raise BadParameter(f"this model's maximum context length is {context} tokens, and the prompt is "
                           f"{n_prompt} tokens: no room is left to generate", where)
    max_tokens = params.max_tokens if params.max_tokens != UP_TO_CONTEXT else context - n_prompt
    if n_prompt + max_tokens > context:
        raise BadParameter(f"this model's maximum context length is {context} tokens; the prompt is {n_prompt} "
                           f"tokens and max_tokens is {max_tokens} ({n_prompt + max_tokens} in all): lower "
                           f"max_tokens to {context - n_prompt} or less", "max_tokens")
    params = replace(params, max_tokens=max_tokens)
    params.check()
    return params


class Generations:
    """The data plane's generation side: one per data plane, on the event loop."""

    def __init__(self, repo: Repository, metrics: Metrics) -> None:
        self.repo = repo
        self.metrics = metrics
        self._starting: dict[str, asyncio.Future[None]] = {}  # per model: a _cold started early

    async def start(self, entry: ModelEntry, prompt: Prompt, params: SamplingParams,
                    priority: Priority) -> Generation:
        """Tokenize and check the prompt; the returned deltas start the sequence when first asked.

        Raises ``BadRequest`` (``BadParameter`` naming the field) before anything runs: a model
        that does not generate, a prompt that leaves no room in the context, a field out of range.
        """
        t0 = time.monotonic()
        codec = await entry.instance.prompt_codec()  # BadRequest for a model that is no LM
        if not isinstance(prompt, str) and not codec.chat_ready:
            # A codec means a causal LM: its cold load (the weights' read) need not wait for the
            # chat template's first build (transformers' import). A refused chat still loads it.
            self._start_cold(entry, priority)
        ids = await prompt_ids(codec, prompt)
        context = codec.context_length
        params = fit_context(len(ids), context, params, chat=not isinstance(prompt, str))
        # The load starts now, not when the front end first iterates the deltas.
        self._start_cold(entry, priority)
        return Generation(entry.name, len(ids), params.max_tokens, context,
                          self._run(entry, ids, params, priority, t0))

    def _start_cold(self, entry: ModelEntry, priority: Priority) -> None:
        """``_cold`` in the background; the sequence waits for it in ``_run`` (one make_room)."""
        task = self._starting.get(entry.name)
        if (task is not None and not task.done()) or entry.state in ("ready", "loading") \
                or entry.loading is not None or entry.unloading:
            return
        task = self._starting[entry.name] = asyncio.ensure_future(self._cold(entry, priority))
        task.add_done_callback(_retrieve)  # its error reaches the sequence through _run

    async def _joined_cold(self, entry: ModelEntry, priority: Priority) -> None:
        task = self._starting.get(entry.name)
        if task is not None and not task.done():
            await asyncio.shield(task)  # its error (no room) is this sequence's, as before
        await self._cold(entry, priority)

    async def _cold(self, entry: ModelEntry, priority: Priority) -> None:
        """A cold model's load, started as the repository's API load is (room made in the memory
        budget, tracked: cold-start metrics, other requests wait for it), before the sequence
        joins it. A client that leaves during the load does not cancel it, as with V2 infer."""
        while entry.unloading:
            await asyncio.sleep(0.01)
        if entry.state in ("ready", "loading") or entry.loading is not None:
            return
        await self.repo.make_room(entry)
        if entry.loading is None and entry.state != "ready":
            task = asyncio.ensure_future(entry.instance.load(priority=priority))
            task.add_done_callback(_retrieve)  # its error reaches the sequence through generate
            self.repo.track_load(entry, task)

    async def _run(self, entry: ModelEntry, ids: list[int], params: SamplingParams, priority: Priority,
                   t0: float) -> AsyncGenerator[GenerationDelta, None]:
        m, name = self.metrics, entry.name
        entry.busy += 1  # in use: neither keep-alive nor the memory budget unloads it meanwhile
        reason = "abort"
        seen = 0
        first = last = None
        try:
            try:
                await self._joined_cold(entry, priority)
                deltas = entry.instance.generate(ids, params, priority=priority)
                try:
                    async for d in deltas:
                        now = time.monotonic()
                        if first is None:
                            first = now
                            m.prompt_tokens.inc(len(ids), model_name=name)
                            m.ttft_s.observe(now - t0, model_name=name)
                        elif last is not None and d.completion_tokens > seen:
                            gap = (now - last) / (d.completion_tokens - seen)
                            for _ in range(d.completion_tokens - seen):
                                m.itl_s.observe(gap, model_name=name)
                        if d.completion_tokens > seen:
                            m.generation_tokens.inc(d.completion_tokens - seen, model_name=name)
                            seen, last = d.completion_tokens, now
                        if d.finish_reason is not None:
                            reason = d.finish_reason
                        yield d
                finally:
                    if isinstance(deltas, AsyncGenerator):
                        await deltas.aclose()  # the engine frees the sequence's KV cache now
            except Overloaded:
                m.shed.inc(model=name, reason="generation")
                reason = "overloaded"
                raise
            except BadRequest:
                reason = "bad_request"
                raise
            except Exception:
                reason = "error"
                raise
        finally:
            entry.busy -= 1
            entry.last_used = time.monotonic()
            ok = reason in ("stop", "length")
            if ok or reason == "abort":  # vLLM's outcomes: stop, length, abort (the client left)
                m.request_success.inc(model_name=name, finished_reason=reason)
            else:
                m.request_failure.inc(model_name=name, reason=reason)
            (m.success if ok else m.failure).inc(model=name, version="1")
            m.e2e_s.observe(time.monotonic() - t0, model_name=name)
            self.repo.on_change()

    def collect(self) -> None:
        """Scrape time: each generating model's running and waiting sequences and KV cache use."""
        m = self.metrics
        for name, e in self.repo.models.items():
            s = e.instance.generation_stats
            key = (("model_name", name),)
            if not s.kv_cache_bytes_budget and not s.running and not s.waiting and key not in m.running.values:
                continue  # a model that never generated: no series
            m.running.set(s.running, model_name=name)
            m.waiting.set(s.waiting, model_name=name)
            m.kv_usage.set(s.kv_cache_bytes_used / s.kv_cache_bytes_budget if s.kv_cache_bytes_budget else 0.0,
                           model_name=name)
            m.kv_used.set(s.kv_cache_bytes_used, model_name=name)
            m.kv_budget.set(s.kv_cache_bytes_budget, model_name=name)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
