"""The engine's tokenizer side: prompts to ids, ids back to streamed text, read from the model dir.

``read_codec`` reads tokenizer.json, tokenizer_config.json (its ``chat_template``, or a
``chat_template.jinja`` beside it) and generation_config.json through the model's storage
backend, like config.json: nothing is downloaded and nothing touches the local disk, so a model
in S3 or behind a peer tokenizes the same as a local one. ``tokenizers`` does encode and decode;
transformers is built only to render the chat template (its jinja environment is the one the
checkpoint's template was written for).

``Detokenizer`` streams a sequence's text. It decodes a short window of ids, not the whole list,
so a step costs O(1) in the sequence's length (vLLM's prefix_offset/read_offset scheme): the
window starts at the tokens before the last emitted ones, which gives decoders that look at their
neighbours (a SentencePiece space stripped at the start of a text) the same context each time,
and the text they produce past that known prefix is the new text. What it emits is exact: the
pushed texts joined with ``flush()`` equal ``decode`` of all the ids (when no stop string hits),
and no piece ends inside a character:
- a trailing U+FFFD is held back: with byte-level BPE a token can end in the middle of a UTF-8
  sequence, and the character appears only when the next token completes it;
- with SentencePiece byte fallback (``<0xE6>`` tokens) a run of byte tokens decodes as one group,
  so nothing of a trailing run is emitted until a normal token ends it;
- any tail that could begin a stop string is held back, and a stop string ends the text right
  before it (it may span tokens; it is never emitted).
Decoding skips special tokens and does not apply transformers' ``clean_up_tokenization_spaces``
(which is not incremental; vLLM's stream skips it too).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from cicada_async.engine.modeldir import ModelSpec, read_model_spec, read_small
from protocols.errors import BadRequest, ConfigError
from protocols.generation import ChatMessage, TokenLogprob
from protocols.storage import StorageBackend

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKENIZER_FILE_LIMIT = 64 << 20  # Qwen2's tokenizer.json is 7 MB, Llama 3's 9 MB
_GENERATIVE = ("ForCausalLM", "LMHeadModel")  # transformers' class-name suffixes of text generators
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_FFFD = "\ufffd"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes-to-unicode map, inverted: byte-level BPE spells byte b as this character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


_ALPHABET = _byte_level_alphabet()


class Detokenizer:
    """One sequence's incremental text, held back where it could still change (module doc)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = (),
                 joins_next: Callable[[int], bool] | None = None) -> None:
        """``joins_next(id)``: whether a trailing id's text may still change with the ids after
        it (byte-fallback pieces, and the invisible ids between them); None: never."""
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._joins_next = joins_next
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window starts here: context for the decoder
        self._read_offset = 0  # ids before this are emitted and settled
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._emitted = 0  # characters of the window past prefix_text already emitted
        self._held = ""  # emitted by the window but held for a possible stop string
        self._done = False
        self.stopped = False
        """A stop string appeared: the text before it is all there is."""

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """The new ids' text that is safe to emit, and whether a stop string appeared (then the
        text ends right before it and the sequence is over; later pushes give ``("", True)``)."""
        if self.stopped:
            return "", True
        if self._done:
            raise RuntimeError("push after flush: the sequence is over")
        ids = self._ids
        ids.extend(token_ids)
        end = len(ids)
        if self._joins_next is not None:
            while end > self._read_offset and self._joins_next(ids[end - 1]):
                end -= 1  # a byte-fallback run decodes as one group with the bytes after it
        text = self._decode(ids[self._prefix_offset:end])
        safe = len(text.rstrip(_FFFD))  # a trailing U+FFFD may be a character's first bytes
        start = len(self._prefix_text) + self._emitted
        new = text[start:safe] if safe > start else ""
        self._emitted += len(new)
        if end == len(ids) > self._read_offset and safe == len(text):
            # Everything decoded is final: the next window starts at this step's new ids.
            self._prefix_offset, self._read_offset = self._read_offset, end
            self._prefix_text = self._decode(ids[self._prefix_offset:end])
            self._emitted = 0
        return self._release(new)

    def flush(self) -> str:
        """At the end (eos or length): everything held back is final text now. A stop-string
        prefix that never completed is real text; a stop string the last bytes completed still
        cuts the text (``stopped`` is then True)."""
        if self.stopped or self._done:
            return ""
        self._done = True
        text = self._decode(self._ids[self._prefix_offset:])
        out, _ = self._release(text[len(self._prefix_text) + self._emitted:], final=True)
        return out

    def _release(self, new: str, *, final: bool = False) -> tuple[str, bool]:
        if not self._stop:
            return new, False
        text = self._held + new
        # Nothing emitted before ``_held`` can start a stop string (it would have been held),
        # so the first hit is in here. First means the first to complete, as if the text came
        # a character at a time (how it arrived in pushes must not matter), the longer on a tie.
        hits = [(i + len(s), -len(s)) for s in self._stop if (i := text.find(s)) >= 0]
        if hits:
            end, minus_len = min(hits)
            self.stopped = True
            self._held = ""
            return text[:end + minus_len], True
        keep = 0 if final else self._stop_prefix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest tail of ``text`` that begins some stop string."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


class TextCodec:
    """A model's tokenizer and limits (``protocols.generation.PromptCodec``), from its directory."""

    def __init__(self, tokenizer: Tokenizer, *, name: str, context_length: int,
                 eos_token_ids: frozenset[int], chat: Any = None, byte_level: bool = True,
                 byte_pieces: frozenset[int] = frozenset(), metaspace: bool = False,
                 chat_factory: Callable[[], Any] | None = None) -> None:
        """``chat``: a transformers tokenizer holding the chat template; or ``chat_factory``,
        which builds one on the first chat (transformers is imported then, not before)."""
        self._tok = tokenizer
        self._name = name
        self._chat = chat
        self._chat_factory = None if chat is not None else chat_factory
        self._chat_lock = threading.Lock()
        self._byte_level = byte_level
        self._byte_pieces = byte_pieces
        self._metaspace = metaspace
        self._token_bytes: dict[int, bytes] = {}
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # Skipped in decode, so byte pieces on either side of them decode as one group.
        self._special = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str) -> list[int]:
        """A completion prompt's ids, with the special tokens the tokenizer adds (a BOS)."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The chat template with the assistant's generation prompt, as ids."""
        chat = self._chat if self._chat_factory is None else self.prepare_chat()
        if chat is None:
            raise BadRequest(f"model {self._name} has no chat template; use completions instead")
        try:
            text = chat.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template raises what it likes (raise_exception, TypeError)
            raise BadRequest(f"model {self._name}'s chat template refused the messages: {e}") from None
        if not isinstance(text, str):
            raise BadRequest(f"model {self._name}'s chat template rendered no text")
        # The template writes the special tokens (a BOS too, where the model wants one).
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    @property
    def chat_ready(self) -> bool:
        """False until the chat template's tokenizer is built (``prepare_chat``, or a chat)."""
        return self._chat_factory is None

    def prepare_chat(self) -> Any:
        """Build the chat template's tokenizer now (a blocking call: it imports transformers,
        which may wait for the engine's warm import): a worker thread's job, not the loop's."""
        with self._chat_lock:
            if self._chat_factory is not None:
                self._chat = self._chat_factory()
                self._chat_factory = None
            return self._chat

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens skipped (ids past the tokenizer's are none)."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def token_logprob(self, token_id: int, logprob: float) -> TokenLogprob:
        """The token's own text (a special token's too) and UTF-8 bytes: a byte-level token
        that ends mid-character has its raw bytes here and U+FFFD in its text."""
        raw = self._bytes_of(token_id)
        return TokenLogprob(raw.decode("utf-8", "replace"), logprob, tuple(raw))

    def detokenizer(self, stop: Sequence[str] = ()) -> Detokenizer:
        """A sequence's incremental text; ``stop``: its stop strings."""
        return Detokenizer(self.decode, stop, self._joins_next if self._byte_pieces else None)

    def _joins_next(self, token_id: int) -> bool:
        return (token_id in self._byte_pieces or token_id in self._special
                or not 0 <= token_id < self.vocab_size)

    def _bytes_of(self, token_id: int) -> bytes:
        raw = self._token_bytes.get(token_id)
        if raw is None:
            piece = self._tok.id_to_token(token_id) if token_id >= 0 else None
            if piece is None:
                raw = b""
            elif self._byte_level and all(c in _ALPHABET for c in piece):
                raw = bytes(_ALPHABET[c] for c in piece)
            elif token_id in self._byte_pieces:
                raw = bytes([int(piece[3:5], 16)])
            else:  # an added token (ByteLevel decodes it as is), or a SentencePiece piece
                raw = (piece.replace("▁", " ") if self._metaspace else piece).encode()
            self._token_bytes[token_id] = raw
        return raw


async def read_codec(backend: StorageBackend, spec: ModelSpec, *, name: str | None = None) -> TextCodec:
    """The tokenizer of the model whose directory ``backend`` serves (``spec`` from
    ``read_model_spec``). ``name`` is the model's name in error messages.

    Raises ``BadRequest`` when the model does not generate text (no causal-LM architecture, or
    no tokenizer.json), ``ConfigError`` when its tokenizer files are broken."""
    label = name or spec.architecture
    if spec.kind != "transformers" or not spec.architecture.endswith(_GENERATIVE):
        raise BadRequest(f"model {label} does not generate text: {spec.architecture} is not a causal "
                         "language model")
    tok_raw, cfg_raw, gen_raw, jinja_raw = await asyncio.gather(
        read_small(backend, "tokenizer.json", limit=TOKENIZER_FILE_LIMIT),
        read_small(backend, "tokenizer_config.json"),
        read_small(backend, "generation_config.json"),
        read_small(backend, "chat_template.jinja"),
    )
    if tok_raw is None:
        raise BadRequest(f"model {label} does not generate text: its directory has no tokenizer.json")
    tok_cfg = _json(cfg_raw, "tokenizer_config.json")
    gen_cfg = _json(gen_raw, "generation_config.json")
    template = _chat_template(tok_cfg, jinja_raw)
    # Parsing a large tokenizer.json takes ~1 s: not on the loop.
    return await asyncio.to_thread(_build, tok_raw, tok_cfg, gen_cfg, template, spec, label)


def _build(tok_raw: bytes, tok_cfg: dict[str, Any], gen_cfg: dict[str, Any], template: str | None,
           spec: ModelSpec, label: str) -> TextCodec:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(tok_raw.decode())
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ConfigError(f"tokenizer.json of model {label} cannot be read: {e}") from None
    # A hub tokenizer.json may carry truncation or padding: a prompt must never be cut silently.
    tok.no_truncation()
    tok.no_padding()
    decoder_types = set(_types(orjson.loads(tok_raw).get("decoder")))
    byte_pieces: frozenset[int] = frozenset()
    if "ByteFallback" in decoder_types:
        byte_pieces = frozenset(i for t, i in tok.get_vocab(with_added_tokens=False).items()
                                if _BYTE_PIECE.fullmatch(t))
    specials = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if (t := _token_text(tok_cfg.get(k))) is not None}
    chat: Callable[[], Any] | None = None
    if template is not None:
        # Built on the first chat, not here: transformers' import (seconds, in flight on the
        # engine's executor in a fresh process) must not hold up a completion's prompt, nor the
        # cold load that starts once the prompt is tokenized (docs/process-start.md).
        def make_chat(text: str = tok_raw.decode(), template: str = template) -> Any:
            from cicada_async.engine import hfimport

            fast = hfimport.attr("PreTrainedTokenizerFast")  # a worker thread: see hfimport
            assert isinstance(fast, type)
            # Its own Tokenizer: transformers may add tokens or set options on the one it is given.
            return fast(tokenizer_object=Tokenizer.from_str(text), chat_template=template, **specials)

        chat = make_chat
    eos = _ids(gen_cfg.get("eos_token_id")) or _ids(spec.config.get("eos_token_id"))
    if not eos and "eos_token" in specials:
        eos_id = tok.token_to_id(specials["eos_token"])
        eos = frozenset(() if eos_id is None else (eos_id,))
    return TextCodec(tok, name=label, context_length=_context_length(spec.config, tok_cfg, label),
                     eos_token_ids=eos, chat_factory=chat, byte_level="ByteLevel" in decoder_types,
                     byte_pieces=byte_pieces, metaspace=bool(decoder_types & {"Metaspace", "Replace"}))


def _json(raw: bytes | None, key: str) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"{key} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{key} must hold a JSON object")
    return obj


def _chat_template(tok_cfg: dict[str, Any], jinja_raw: bytes | None) -> str | None:
    """tokenizer_config.json's template (a string, or named ones: "default" first), else the
    chat_template.jinja that transformers 5 writes beside it."""
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default", next(iter(named.values()), None))
    if isinstance(t, str) and t:
        return t
    return jinja_raw.decode() if jinja_raw else None


def _token_text(value: object) -> str | None:
    # A special token is a string, or an AddedToken written out as {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: object) -> frozenset[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return frozenset((value,))
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return frozenset()


def _context_length(config: dict[str, Any], tok_cfg: dict[str, Any], label: str) -> int:
    for key in (*_POSITIONS, "model_max_length"):
        value = (tok_cfg if key == "model_max_length" else config).get(key)
        # transformers writes a huge model_max_length when it does not know one
        if isinstance(value, int) and 0 < value < 1 << 30:
            return value
    raise ConfigError(f"model {label}'s config.json names no context length ({', '.join(_POSITIONS)})")


def _types(node: object) -> Iterator[str]:
    """Every component ``type`` in a tokenizer.json decoder, through Sequence decoders."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        for child in node.get("decoders") or ():
            yield from _types(child)


if TYPE_CHECKING:
    from protocols.generation import PromptCodec

    def _implements_the_seam(codec: TextCodec) -> PromptCodec:
        return codec  # mypy checks that TextCodec is a PromptCodec


class CodecReader:
    """A model's tokenizer, read once from its storage when first asked (a failed read is tried
    again; ``BadRequest``, a model that does not generate text, is final)."""

    def __init__(self, name: str, backend: Callable[[], StorageBackend]) -> None:
        self._name = name
        self._backend = backend  # opens the model's storage
        self._task: asyncio.Future[TextCodec] | None = None

    async def get(self) -> TextCodec:
        task = self._task
        if task is None or (task.done() and (task.cancelled() or _retry(task.exception()))):
            task = self._task = asyncio.ensure_future(self._read())
        return await asyncio.shield(task)

    async def _read(self) -> TextCodec:
        backend = self._backend()
        try:
            return await read_codec(backend, await read_model_spec(backend), name=self._name)
        finally:
            await backend.aclose()


def _retry(error: BaseException | None) -> bool:
    """A read that failed for a reason that may pass (storage), not a refusal."""
    return error is not None and not isinstance(error, BadRequest)
