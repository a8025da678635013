"""The generation seam: what the data plane asks of a model that generates text.

Front ends (OpenAI, Triton's generate, Ray Serve) turn their wire shapes into a prompt (text,
or chat messages rendered by the model's own chat template) and ``SamplingParams``; the engine
tokenizes with the model directory's tokenizer, runs the sequence in its continuous batch and
yields ``GenerationDelta``s. Nothing here names a transport or a tokenizer library.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from protocols.priority import Priority

FinishReason = Literal["stop", "length"]
ChatRole = Literal["system", "user", "assistant", "tool", "developer"]
MAX_LOGPROBS = 5  # top alternatives per token, as the OpenAI API allows


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a chat, as the model's chat template takes it."""

    role: ChatRole
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence is sampled and when it stops. Checked by ``check``; the engine trusts it.

    ``temperature == 0`` is greedy (argmax, as transformers' ``do_sample=False``). Penalties are
    OpenAI's: ``presence_penalty`` once per token already generated, ``frequency_penalty`` times
    its count, subtracted from the logits before temperature, top-k and top-p.
    """

    max_tokens: int
    """Tokens to generate at most; the prompt plus these must fit the model's context."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    seed: int | None = None
    """Same seed, prompt and parameters: the same tokens (a per-sequence generator)."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends before the first one; it is never returned."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    """None: no logprobs; k in 0..MAX_LOGPROBS: the chosen token's and the k most likely."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""

    def check(self) -> None:
        """Raise ``protocols.errors.BadRequest`` naming the first field out of range."""
        from protocols.errors import BadRequest

        if self.max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise BadRequest(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BadRequest(f"top_k must be 0 (off) or more, got {self.top_k}")
        for name, value in (("presence_penalty", self.presence_penalty),
                            ("frequency_penalty", self.frequency_penalty)):
            if not -2.0 <= value <= 2.0:
                raise BadRequest(f"{name} must be between -2 and 2, got {value}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise BadRequest(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise BadRequest("stop takes at most 4 non-empty strings")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token, its log-probability under the model's raw distribution, and its UTF-8 bytes."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepLogprobs:
    """The sampled token's logprob and the ``k`` most likely alternatives at one step."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """What one sequence produced since its previous delta.

    ``text`` holds whole UTF-8 characters only and never any part of a stop string; the
    deltas' texts joined are the whole completion. The last delta has ``finish_reason`` set.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[StepLogprobs, ...]
    """One entry per token of ``token_ids`` when ``SamplingParams.logprobs`` is set, else ()."""
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far (the stop string's tokens included: they were computed)."""


class PromptCodec(Protocol):
    """A generative model's tokenizer and limits, read from its directory (never downloaded)."""

    @property
    def context_length(self) -> int:
        """Prompt plus generated tokens, at most (the config's max_position_embeddings)."""
        ...

    def encode(self, text: str) -> list[int]:
        """A completion prompt's token ids (with the BOS token where the tokenizer adds one)."""
        ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat template applied, with the assistant's generation prompt, as token ids.

        Raises ``BadRequest`` when the model has no chat template or the template refuses the
        messages (for example a role it does not know)."""
        ...

    @property
    def chat_ready(self) -> bool:
        """False until ``prepare_chat`` ran: ``render_chat`` would build the template first."""
        ...

    def prepare_chat(self) -> object:
        """Build what ``render_chat`` needs (it may import transformers: blocking, for a
        worker thread, never the event loop)."""
        ...


class GenerativeModel(Protocol):
    """What a served causal language model adds to ``protocols.serving.ServedModel``."""

    async def prompt_codec(self) -> PromptCodec:
        """The tokenizer (read once, from the model's storage; weights are not read).

        Raises ``BadRequest`` when the model does not generate text (no causal-LM
        architecture or no tokenizer in its directory)."""
        ...

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 priority: Priority) -> AsyncIterator[GenerationDelta]:
        """Generate one sequence: loads the model if cold, joins the running batch at the next
        iteration, yields deltas until one has ``finish_reason`` set.

        Closing the iterator early (``aclose``, or the consuming task cancelled) removes the
        sequence and frees its KV cache at once. Raises ``BadRequest`` when the prompt plus
        ``max_tokens`` exceeds the context, ``Overloaded`` when the KV cache budget cannot
        hold the sequence and its waiting line is full."""
        ...

    @property
    def generation_stats(self) -> GenerationStats:
        """Running and waiting sequences and KV cache use, for metrics."""
        ...


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """A snapshot of one model's generation loop."""

    running: int
    waiting: int
    kv_cache_bytes_used: int
    kv_cache_bytes_budget: int
