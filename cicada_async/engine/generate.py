"""Text generation: one model's continuous batch, stepped on the executor by priority.

``GenerationLoop.generate`` checks a sequence, loads the model if cold and puts the sequence in
a waiting heap ordered by (priority, arrival). The loop (one asyncio task per model, started on
demand, ending when it has nothing left) repeats one iteration:

0. (before the loop, while the model loads) a sequence rides the load's cold batch
   (``coldprefill.py``): one padded prefill of every sequence that arrived during the load,
   computed layer by layer through the gated model as the weights land; it enters the waiting
   heap with its cache and first token;
1. admit the most urgent waiting sequences while ``max_sequences`` and the KV budget allow
   (``kvcache.py``: the padded worst case of the live rows stays within the budget); rows that
   left (finished, abandoned) go first, in the first job that copies the cache anyway;
2. prefill each admitted sequence alone (batch of 1, one executor job at its priority) and
   sample its first token, unless a cold batch did;
3. one decode step of the whole batch, the new rows merged in first (one executor job at the
   most urgent priority among its rows); rows that hit end-of-sequence or ``max_tokens``
   leave the cache in the same job.

Jobs run under ``torch.inference_mode`` and a warm forward's thread setting; the model keeps
the yield points ``LoadJob.remove_gates`` left, so a decode step hands the executor to more
urgent work at each layer. Tokens reach each sequence's queue as ``GenerationDelta``s, text
detokenized on the loop (a stop string ends a sequence there; its row leaves at the next job).
A consumer that goes away (``aclose``, cancellation) takes its sequence out at once: from the
heap, or its row at the next job, which the consumer awaits.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from protocols.errors import BadRequest, CicadaError, InferenceError, LoadError, Overloaded
from protocols.generation import GenerationDelta, GenerationStats, SamplingParams
from protocols.serving import ModelOptions, Priority
from protocols.storage import StorageBackend

from cicada_async.engine.coldprefill import ColdRides
from cicada_async.engine.forward import all_cores
from cicada_async.engine.kvcache import BatchCache, KVShape, kv_shape, new_cache, tensors_bytes, worst_case_bytes
from cicada_async.engine.lmcall import LmCall
from cicada_async.engine.sampling import Choice, RowSampler, choose
from cicada_async.engine.sequence import GenerationCodec, GenSequence, LoopEngine
from cicada_async.engine.textcodec import CodecReader, TextCodec

if TYPE_CHECKING:  # transformers is imported on the executor, never at the engine's import
    from transformers.cache_utils import DynamicCache

    from cicada_async.engine.job import LoadJob

__all__ = ["GenerationCodec", "GenerationLoop", "LoopEngine", "is_causal_lm"]

WAITING_PER_SLOT = 4  # the waiting line holds this many sequences per batch slot, then sheds


def is_causal_lm(architecture: str) -> bool:
    """A transformers class that generates text (``LlamaForCausalLM``, ``GPT2LMHeadModel``)."""
    return architecture.endswith(("ForCausalLM", "LMHeadModel"))


class GenerationLoop:
    """The continuous batch of one model (``ModelInstance.generation``)."""

    def __init__(self, name: str, options: ModelOptions, engine: LoopEngine,
                 load: Callable[[Priority], Awaitable[None]], model: Callable[[], nn.Module | None],
                 backend: Callable[[], StorageBackend],
                 prepared: Callable[[Priority], Awaitable[LoadJob | None]] | None = None) -> None:
        """``load`` loads the model (if cold), ``model`` is the loaded one (None: unloaded),
        ``backend`` opens the model's storage (its tokenizer files), ``prepared`` starts the load
        if cold and returns its job once the gates are in (None: the model is ready; no
        ``prepared``: no cold batches, a sequence waits for the whole load)."""
        self.name = name
        self.options = options
        self._engine = engine
        self._load = load
        self._model = model
        self._heap: list[tuple[Priority, int, GenSequence]] = []
        self._arrival = itertools.count()
        self._loading = 0  # sequences waiting for the model's load (counted as waiting)
        self._joining: list[GenSequence] = []  # admitted this iteration, not yet in the batch
        self._running: list[GenSequence] = []  # the batch's rows, in order
        # Admitted and not yet out of the cache, wherever they are (a job in flight holds the
        # list of its rows): what stop() must fail.
        self._members: set[GenSequence] = set()
        self._batch = BatchCache()
        self._kv_bytes = 0  # the cache's tensors after the last job
        self._task: asyncio.Task[None] | None = None
        self._shape: tuple[nn.Module, KVShape, LmCall] | None = None  # per loaded model
        self._codec = CodecReader(name, backend)
        self._prepared = prepared
        self._cold = ColdRides(engine, options)

    # public ------------------------------------------------------------------------------
    def stats(self, budget: int) -> GenerationStats:
        held = self._prefilled()  # waiting with a cache: running
        return GenerationStats(running=sum(s.live for s in self._running + self._joining) + len(held),
                               waiting=len(self._heap) - len(held) + self._loading, kv_cache_bytes_budget=budget,
                               kv_cache_bytes_used=self._kv_bytes + sum(tensors_bytes(s.cache) for s in held))

    @property
    def reserved_bytes(self) -> int:
        """Worst-case bytes of the live rows and cold riders (prompt + max_tokens each, no padding)."""
        shape = self._shape
        live = [s for s in self._running + self._joining if s.live] + self._cold.pending()
        return sum(s.final_len for s in live) * shape[1].token_bytes if shape else 0

    def _prefilled(self) -> list[GenSequence]:
        """Waiting sequences that hold a cache already (a cold batch prefilled them)."""
        return [e[2] for e in self._heap if e[2].cache is not None and e[2].live]

    async def codec(self) -> TextCodec:
        return await self._codec.get()

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *, priority: Priority,
                       codec: GenerationCodec | None = None) -> AsyncIterator[GenerationDelta]:
        """One sequence's deltas (``GenerativeModel.generate``). ``codec``: the model's
        tokenizer (read from its directory when None; a stand-in works on token ids alone)."""
        if codec is None:
            codec = await self.codec()
        params.check()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise BadRequest("the prompt has no tokens")
        bad = [t for t in prompt if not 0 <= t < codec.vocab_size]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary of {self.name} (0..{codec.vocab_size - 1})")
        self._check_fits(len(prompt), params.max_tokens, codec.context_length, "context length")
        self._check_room()
        seq: GenSequence | None = None
        arrival = next(self._arrival)  # its place among equals: when it came, not when it loaded
        self._loading += 1
        try:
            try:
                job = await self._prepared(priority) if self._prepared is not None else None
                if job is not None:  # loading: ride its first prefill
                    seq = self._sequence(prompt, params, priority, codec, job.model, torch.device(self.options.device))
                    await self._cold.ride(job, seq, self._forward, self._shape_of(job.model).token_bytes)
                    if job.error is not None:  # the load it rode failed (or was unloaded): not a new one
                        raise job.error
                    if job.spec.manifest is None:
                        seq.take_first()  # without a manifest to verify, at once
                await self._load(priority)
            finally:
                self._loading -= 1
            if seq is None:
                model, _ = self._model_shape()
                seq = self._sequence(prompt, params, priority, codec, model, _device(model))
            seq.take_first()  # (a model with a manifest: once the load verified it)
            if seq.live:
                heapq.heappush(self._heap, (priority, arrival, seq))
                self._kick()
            while True:
                delta = await seq.next_delta()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if seq is not None:
                await self._abandon(seq)
            self._kick()  # a rider that left (or never came in) may have held the head's room

    async def stop(self, error: CicadaError) -> None:
        """Stop the loop and fail every sequence, waiting or running, with ``error``."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._fail_all(error)
        self._shape = None
        self._cold.clear()

    # the consumer's side ------------------------------------------------------------------
    def _sequence(self, prompt: list[int], params: SamplingParams, priority: Priority,
                  codec: GenerationCodec, model: nn.Module, device: torch.device) -> GenSequence:
        shape = self._shape_of(model)
        seq = GenSequence(prompt, params, priority, codec, codec.detokenizer(params.stop), RowSampler(params, device))
        if shape.context_cap is not None:
            self._check_fits(len(prompt), params.max_tokens, shape.context_cap, "sliding window")
        need = seq.final_len * shape.token_bytes
        if need > self.options.kv_cache_bytes:
            raise BadRequest(f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} need {need} bytes "
                             f"of KV cache; {self.name}'s budget is {self.options.kv_cache_bytes}")
        return seq

    def _check_fits(self, prompt: int, max_tokens: int, limit: int, what: str) -> None:
        if prompt + max_tokens > limit:
            raise BadRequest(f"{prompt} prompt tokens + max_tokens {max_tokens} = {prompt + max_tokens} "
                             f"exceed the {what} of {self.name} ({limit} tokens)")

    def _check_room(self) -> None:
        limit = WAITING_PER_SLOT * self.options.max_sequences
        if len(self._heap) + self._loading >= limit:
            raise Overloaded(f"{self.name}: {limit} sequences already wait to generate", retry_after_s=1.0)

    async def _abandon(self, seq: GenSequence) -> None:
        """The consumer is done: finished, failed, or gone early (then take its sequence out)."""
        if not seq.live or seq.left.done():
            return
        seq.gone = True
        if not seq.admitted:
            self._heap = [e for e in self._heap if e[2] is not seq]
            heapq.heapify(self._heap)
            seq.release()
            return
        # Its row leaves at the loop's next job; its caller learns the KV is free when it returns.
        if self._task is None or self._task.done():
            seq.release()  # no loop: nothing holds it (stop() dropped the batch)
        await asyncio.shield(seq.left)

    # the loop --------------------------------------------------------------------------------
    def _model_shape(self) -> tuple[nn.Module, KVShape]:
        model = self._model()
        if model is None:
            raise LoadError(f"model {self.name} was unloaded")
        return model, self._shape_of(model)

    def _shape_of(self, model: nn.Module) -> KVShape:
        """The model's KV shape and forward arguments (a loading model's skeleton is the model)."""
        if self._shape is None or self._shape[0] is not model:
            self._shape = (model, kv_shape(model.config, next(model.parameters()).dtype), LmCall.of(model))
        return self._shape[1]

    async def _run(self) -> None:
        me = asyncio.current_task()
        try:
            while True:
                try:
                    model, _ = self._model_shape()
                except LoadError as e:
                    self._fail_all(e)
                    return
                self._members = {s for s in self._members if not s.left.done()}
                self._admit()
                if self._joining:
                    await self._compact()
                for seq in sorted(self._joining, key=lambda s: s.priority):
                    if seq.live and seq.cache is None:  # (a cold batch prefilled the others)
                        await self._prefill(model, seq)
                if not any(s.live for s in self._running + self._joining):
                    for s in self._running + self._joining:
                        s.release()
                    self._running, self._joining = [], []
                    self._batch, self._kv_bytes = BatchCache(), 0  # nothing live: the tensors go
                    if not self._heap or not self._joining:
                        return  # (nothing admitted: riders of a cold batch hold the room; _kick)
                    continue
                await self._decode(model)
        except asyncio.CancelledError:
            if self._task is me:  # cancelled from outside (the event loop closing), not by stop()
                self._fail_all(InferenceError(f"the generation loop of {self.name} was cancelled"))
            raise
        except BaseException as e:  # a bug of ours: nobody may hang on it
            self._fail_all(InferenceError(f"the generation loop of {self.name} failed: {type(e).__name__}: {e}"))
            raise
        finally:
            if self._task is me:
                self._task = None

    def _kick(self) -> None:  # the loop, if sequences wait and it is not running
        if self._heap and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"generate {self.name}")

    def _admit(self) -> None:
        """Most urgent first, while a batch slot is free and the padded worst case fits."""
        shape = self._shape
        assert shape is not None
        rows = [s for s in self._running if s.live]
        held = self._cold.pending()  # riders of a cold batch, not admitted yet: rows already
        while self._heap and len(rows) + len(self._joining) < self.options.max_sequences:
            seq = self._heap[0][2]
            after = rows + self._joining + [s for s in held if s is not seq and not s.admitted] + [seq]
            if worst_case_bytes([s.final_len for s in after], shape[1].token_bytes) > self.options.kv_cache_bytes:
                break  # the head waits for room; nothing less urgent passes it
            heapq.heappop(self._heap)
            self._kv_bytes += tensors_bytes(seq.cache)  # a cold batch's cache, now the loop's to count
            seq.admitted = True
            self._members.add(seq)
            self._joining.append(seq)

    def _every_core(self, model: nn.Module) -> bool:
        engine = self._engine
        return engine.every_core_when_idle and engine.no_load_running() and _device(model).type == "cpu"

    async def _compact(self) -> None:
        """Rows that left go before a prefill allocates more: what is allocated stays within
        the budget admission counted (only live rows). Otherwise the decode step drops them."""
        keep = [i for i, s in enumerate(self._running) if s.live]
        if len(keep) == len(self._running):
            return
        dropped, batch = [s for s in self._running if not s.live], self._batch

        def job() -> int:
            with torch.inference_mode():
                batch.keep(keep)
                return batch.nbytes()

        try:
            self._kv_bytes = await self._engine.executor.run(job, priority=min(s.priority for s in self._joining))
        except Exception as e:  # noqa: BLE001 - as a failed decode step: its rows fail
            self._fail(self._running, _as_cicada(e))
            self._running, self._batch, self._kv_bytes = [], BatchCache(), 0
            return
        self._running = [self._running[i] for i in keep]
        for s in dropped:
            s.release()

    async def _prefill(self, model: nn.Module, seq: GenSequence) -> None:
        every = self._every_core(model)

        def job() -> tuple[DynamicCache, Choice]:
            with torch.inference_mode(), all_cores(every):
                cache = new_cache()
                device = _device(model)
                ids = torch.tensor([seq.prompt], dtype=torch.long, device=device)
                positions = torch.arange(len(seq.prompt), device=device).unsqueeze(0)
                logits = self._forward(model, ids, None, positions, cache)
                return cache, choose(logits, [seq.sampler])[0]

        try:
            cache, choice = await self._engine.executor.run(job, priority=seq.priority)
        except Exception as e:  # noqa: BLE001 - this sequence's failure; the loop goes on
            self._fail([seq], _as_cicada(e))
            return
        ended = seq.ends_on(choice.token)
        seq.take(choice)
        if not ended and seq.live:
            seq.cache = cache
            self._kv_bytes += tensors_bytes(cache)

    async def _decode(self, model: nn.Module) -> None:
        keep = [i for i, s in enumerate(self._running) if s.live]
        joins = [s for s in self._joining if s.live and s.cache is not None]
        order = [self._running[i] for i in keep] + joins
        dropped = [s for s in self._running + self._joining if not s.live]  # rows (or caches) that go now
        self._running, self._joining = order, []  # (what stats count while the job runs)
        batch, every = self._batch, self._every_core(model)

        def job() -> tuple[list[Choice], list[int], int]:
            with torch.inference_mode(), all_cores(every):
                batch.keep(keep)
                batch.join_all([(s.cache, len(s.prompt)) for s in joins if s.cache is not None])  # (consumed)
                for s in joins:
                    s.cache = None
                device = _device(model)
                ids = torch.tensor([[s.last] for s in order], dtype=torch.long, device=device)
                mask, positions = batch.step_inputs(device)
                logits = self._forward(model, ids, mask, positions, batch.cache)
                batch.advanced()
                choices = choose(logits, [s.sampler for s in order])
                ended = [i for i, (s, c) in enumerate(zip(order, choices)) if s.ends_on(c.token)]
                if ended:
                    batch.keep([i for i in range(len(order)) if i not in ended])
                return choices, ended, batch.nbytes()

        priority = min(s.priority for s in order)
        try:
            choices, ended, self._kv_bytes = await self._engine.executor.run(job, priority=priority)
        except Exception as e:  # noqa: BLE001 - the step's sequences fail; new ones start afresh
            self._fail(order, _as_cicada(e))
            for s in dropped + order:
                s.release()
            self._running, self._batch, self._kv_bytes = [], BatchCache(), 0
            return
        for s in dropped:
            s.release()
        for s, c in zip(order, choices):
            if s.live:
                s.take(c)
        for i in ended:
            order[i].release()
        self._running = [s for i, s in enumerate(order) if i not in set(ended)]

    def _forward(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
                 positions: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        assert self._shape is not None
        return self._shape[2].logits(model, ids, mask, positions, cache)

    def _fail(self, seqs: list[GenSequence], error: BaseException) -> None:
        for s in seqs:
            s.fail(error)

    def _fail_all(self, error: BaseException) -> None:
        """Every sequence, waiting or admitted, fails; the batch's tensors go."""
        self._fail([e[2] for e in self._heap] + list(self._members), error)
        self._heap, self._joining, self._running, self._members = [], [], [], set()
        self._batch, self._kv_bytes = BatchCache(), 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_cicada(e: BaseException) -> CicadaError:
    return e if isinstance(e, CicadaError) else InferenceError(f"generation failed: {type(e).__name__}: {e}")
