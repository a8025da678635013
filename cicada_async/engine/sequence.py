"""One generating sequence: its state in the loop and the deltas its consumer reads.

The loop (``generate.py``) owns the batch; a ``GenSequence`` is what it keeps per sequence: the
prompt, sampling state, where it stands (waiting, admitted, finished, abandoned), and the queue
its consumer reads. ``take`` turns a sampled token into a ``GenerationDelta`` (text from the
tokenizer's incremental detokenizer, logprobs, finish reason) on the event loop. The protocols
name what the loop needs of the tokenizer and of the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from protocols.generation import FinishReason, GenerationDelta, SamplingParams, StepLogprobs, TokenLogprob
from protocols.priority import Priority

from cicada_async.engine.executor import Executor
from cicada_async.engine.sampling import Choice, RowSampler

if TYPE_CHECKING:  # transformers is imported on the executor, never at the engine's import
    from transformers.cache_utils import DynamicCache


class Detokenizer(Protocol):
    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """(text safe to send, whether a stop string hit: the text ends before it)."""
        ...

    def flush(self) -> str:
        """The text held back, at the end (end-of-sequence or max_tokens)."""
        ...


class GenerationCodec(Protocol):
    """What the loop needs of a model's tokenizer (``textcodec.TextCodec`` has it)."""

    @property
    def context_length(self) -> int: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def vocab_size(self) -> int: ...
    def token_logprob(self, token_id: int, logprob: float) -> TokenLogprob: ...
    def detokenizer(self, stop: Sequence[str]) -> Detokenizer: ...


class LoopEngine(Protocol):
    """What the loop uses of the engine (``instance.EngineParts`` has it)."""

    @property
    def executor(self) -> Executor: ...
    @property
    def every_core_when_idle(self) -> bool: ...
    def no_load_running(self) -> bool: ...


@dataclass(eq=False)
class GenSequence:
    prompt: list[int]
    params: SamplingParams
    priority: Priority
    codec: GenerationCodec
    detok: Detokenizer
    sampler: RowSampler
    out: asyncio.Queue[GenerationDelta | BaseException] = field(default_factory=asyncio.Queue)
    left: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Set once its row is out of the cache (or it never had one)."""
    cache: DynamicCache | None = None  # its prefill's cache until it joins the batch
    first: Choice | None = None  # its first token, sampled by a cold batch (coldprefill.py), not yet taken
    last: int = -1  # the last sampled token: the next decode step's input
    generated: int = 0
    admitted: bool = False
    finished: bool = False
    gone: bool = False  # its consumer went away
    held: BaseException | None = None  # an error queued behind deltas: raised at the next read

    @property
    def final_len(self) -> int:
        """Tokens its cache row may hold at most: what admission reserves."""
        return len(self.prompt) + self.params.max_tokens

    @property
    def live(self) -> bool:
        return not (self.finished or self.gone)

    def ends_on(self, token: int) -> bool:
        """The token about to be this sequence's ``generated + 1``-th ends it (without text:
        end-of-sequence or max_tokens; the executor checks this to drop rows in the same job)."""
        eos = token in self.codec.eos_token_ids and not self.params.ignore_eos
        return eos or self.generated + 1 >= self.params.max_tokens

    def take(self, choice: Choice) -> None:
        """One sampled token to the consumer as a delta; the sequence finishes when it ends."""
        token = choice.token
        self.generated += 1
        self.last = token
        eos = token in self.codec.eos_token_ids and not self.params.ignore_eos
        # The end-of-sequence token is counted and returned as an id, never as text.
        text, stopped = ("", False) if eos else self.detok.push([token])
        finish: FinishReason | None = None
        if stopped or eos:
            finish = "stop"
        elif self.generated >= self.params.max_tokens:
            finish = "length"
        if finish is not None and not stopped:
            text += self.detok.flush()  # what was held back (a stop string's prefix that never completed)
        logprobs: tuple[StepLogprobs, ...] = ()
        if self.params.logprobs is not None and choice.logprob is not None:
            tl = self.codec.token_logprob
            logprobs = (StepLogprobs(tl(token, choice.logprob), tuple(tl(i, lp) for i, lp in choice.top)),)
        self.out.put_nowait(GenerationDelta(text=text, token_ids=(token,), logprobs=logprobs, finish_reason=finish,
                                            prompt_tokens=len(self.prompt), completion_tokens=self.generated))
        if finish is not None:
            self.finished = True

    def take_first(self) -> None:
        """The first token a cold batch sampled (``first``), if any, as ``take``; the cache goes
        if that token ended the sequence."""
        choice, self.first = self.first, None
        if choice is None:
            return
        ended = self.ends_on(choice.token)
        if self.live:
            self.take(choice)
        if ended or not self.live:
            self.cache = None

    def fail(self, error: BaseException) -> None:
        if self.live:
            self.out.put_nowait(error)
            self.finished = True
        self.cache = None
        self.release()

    def release(self) -> None:
        """Its row is gone (or it never had one)."""
        if not self.left.done():
            self.left.set_result(None)

    async def next_delta(self) -> GenerationDelta:
        """The next delta, merged with any that queued meanwhile (a slow consumer gets fewer,
        longer deltas, never fewer tokens)."""
        if self.held is not None:
            raise self.held
        item = await self.out.get()
        while True:
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None or self.out.empty():
                return item
            more = self.out.get_nowait()
            if isinstance(more, BaseException):
                self.held = more  # the tokens before it still reach the consumer
                return item
            item = GenerationDelta(text=item.text + more.text, token_ids=item.token_ids + more.token_ids,
                                   logprobs=item.logprobs + more.logprobs, finish_reason=more.finish_reason,
                                   prompt_tokens=more.prompt_tokens, completion_tokens=more.completion_tokens)
