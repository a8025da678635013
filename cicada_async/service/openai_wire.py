"""The OpenAI API's wire shapes: requests validated by pydantic, and answers and errors built.

Requests are parsed strictly: a field of the wrong JSON type is a 400 naming it, never coerced
("1" is no temperature). Fields the API defines that change what a client gets and that we do
not serve (tools, functions, a JSON ``response_format``, ``logit_bias``, ``n`` > 1, ``best_of``,
``echo``, ``suffix``, prompts of token ids or several prompts) are refused with a 400 naming
them; fields that change nothing here (``user``, ``store``, ``metadata``, ``service_tier``, ...)
and unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cicada_async.service.generation import UP_TO_CONTEXT
from protocols.generation import MAX_LOGPROBS, ChatMessage, GenerationDelta, SamplingParams, StepLogprobs

# A JSON object as the OpenAI API shapes it (answers, chunks, errors).
Json = dict[str, object]
_STRICT = ConfigDict(strict=True, extra="ignore")


class UnsupportedField(ValueError):
    """A field the API defines that this server does not serve; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # an extension (vLLM's): 0 or -1 is no cut
    seed: int | None = None
    stop: str | list[str] | None = Field(None)
    n: int = 1
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = Field(0, ge=0, lt=2**31)  # as V2's parameters.priority: 0 the model's default, 1 most urgent
    ignore_eos: bool = False  # an extension (vLLM's), for benchmarks
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise UnsupportedField("n", f"n must be 1 (one choice per request), got {self.n}")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise UnsupportedField("stop", "stop takes at most 4 non-empty strings")

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """``SamplingParams`` with OpenAI's defaults (temperature 1, no max_tokens: up to the context)."""
        return SamplingParams(
            max_tokens=max_tokens or UP_TO_CONTEXT,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def text(self) -> str:
        self.refuse_unsupported()
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", "best_of must be 1")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise UnsupportedField("prompt", "prompt must be one string (a list of prompts is not served)")
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None


def _text(content: str | list[TextPart] | None) -> str:
    """A message's text: its string, or its text parts joined (an assistant's may be null)."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text for p in content)


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[object] | None = None
    tool_choice: object = None
    functions: list[object] | None = None
    response_format: ResponseFormat | None = None

    def chat(self) -> list[ChatMessage]:
        self.refuse_unsupported()
        for name, value in (("tools", self.tools), ("functions", self.functions)):
            if value:
                raise UnsupportedField(name, f"{name} (tool calling) is not supported")
        if self.tool_choice not in (None, "none"):
            raise UnsupportedField("tool_choice", "tool_choice is not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedField("response_format", "only response_format {\"type\": \"text\"} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs: true")
        return [ChatMessage(m.role, _text(m.content)) for m in self.messages]

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# -- errors -----------------------------------------------------------------------------------------
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> Json:
    """OpenAI's error object."""
    kind = _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(e: ValidationError) -> Json:
    """The first problem pydantic found, naming the field as OpenAI does (``messages[0].role``)."""
    first = e.errors(include_url=False)[0]
    param = ""
    for part in first["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and not part[0].isupper() and part not in ("str", "int", "float", "bool", "list"):
            param += f".{part}" if param else part
        else:
            break  # a union member's tag ("str", "list[str]"): the field is named already
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return error(400, message, param or None)


# -- answers ---------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(steps: tuple[StepLogprobs, ...], offset: int) -> Json:
    """The legacy completions shape; ``offset``: characters of the text before these tokens."""
    text_offset = []
    for s in steps:
        text_offset.append(offset)
        offset += len(s.chosen.token)
    return {"tokens": [s.chosen.token for s in steps],
            "token_logprobs": [s.chosen.logprob for s in steps],
            "top_logprobs": [{t.token: t.logprob for t in s.top} for s in steps],
            "text_offset": text_offset}


def chat_logprobs(steps: tuple[StepLogprobs, ...]) -> Json:
    return {"content": [{"token": s.chosen.token, "logprob": s.chosen.logprob, "bytes": list(s.chosen.bytes),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}
                                          for t in s.top]}
                        for s in steps],
            "refusal": None}


class Collected:
    """A whole (not streamed) answer, gathered delta by delta."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.steps: list[StepLogprobs] = []
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, d: GenerationDelta) -> None:
        self.text.append(d.text)
        self.steps.extend(d.logprobs)
        self.finish = d.finish_reason or self.finish
        self.prompt_tokens, self.completion_tokens = d.prompt_tokens, d.completion_tokens
