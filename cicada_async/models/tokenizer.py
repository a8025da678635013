"""The tokenizer of the catalogue's language models: a byte-level BPE trained here, never downloaded.

The corpus is ``pydoc_data.topics.topics``, the help texts that ship with Python (79 texts,
~465 KB of English), so every machine trains the same vocabulary offline. The trainer is
deterministic for a given vocabulary size (same JSON across processes and hash seeds), and one
training costs ~0.3 s, so it is cached per size in-process.

Byte-level BPE (GPT-2's scheme, as Llama 3 and Qwen2 use): any UTF-8 text round-trips, and a
token may end inside a multi-byte character, which is what the engine's incremental detokenizer
(``cicada_async.engine.textcodec``) must handle. The corpus gives ~9200 tokens at most, so
vocabularies are capped at ``MAX_VOCAB``; a model whose ``vocab_size`` is larger (llama's
32000, gpt2's 50257) keeps its embedding size and simply never sees the ids above the
tokenizer's, as real checkpoints pad their embeddings (Qwen2: 151936 rows, 151665 tokens).

Special tokens take ids 0, 1, 2 in this order; the chat template is ChatML (Qwen2's):
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``
as the generation prompt.

Two pre-tokenizer styles: "gpt2" (GPT-2's byte-level regex) and "qwen2" (NFC, then Qwen2's split
regex, then bytes). transformers 5 loads a qwen2 model's tokenizer as its own Qwen2Tokenizer,
whatever tokenizer_config.json names, and that class rebuilds the pre-tokenizer from the vocabulary
and merges: a qwen2 directory with the gpt2 style would encode one way in the engine (from
tokenizer.json) and another in transformers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from protocols.errors import ConfigError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2  # the trainer numbers special tokens first, in order
MAX_VOCAB = 8192
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet and the specials come first

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tokenizer_vocab_size(model_vocab_size: int) -> int:
    """The vocabulary trained for a model with ``model_vocab_size`` embedding rows."""
    size = min(model_vocab_size, MAX_VOCAB)
    if size < _MIN_VOCAB:
        raise ConfigError(f"a byte-level tokenizer needs a vocabulary of at least {_MIN_VOCAB}, "
                          f"the model has {model_vocab_size}")
    return size


# Qwen2's split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX): digits one by one.
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
STYLES = ("gpt2", "qwen2")


@functools.lru_cache(maxsize=8)
def trained_tokenizer_json(vocab_size: int, style: str = "gpt2") -> str:
    """The serialized ``tokenizers.Tokenizer`` (tokenizer.json's text) of ``vocab_size`` tokens.

    A string, not the Tokenizer, is cached: a Tokenizer is mutable (padding, truncation), and
    callers rebuild theirs with ``Tokenizer.from_str``, which is cheap."""
    from pydoc_data.topics import topics
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ConfigError(f"unknown tokenizer style {style!r}; known: {', '.join(STYLES)}")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        # every byte is a token even if the corpus lacks it: no text is ever unencodable
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)  # sorted: a fixed order
    if tok.get_vocab_size() != vocab_size:
        raise ConfigError(f"the corpus gives {tok.get_vocab_size()} tokens, not {vocab_size}")
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [ENDOFTEXT_ID, IM_START_ID, IM_END_ID]:
        raise AssertionError(f"special tokens got ids {ids}")
    return tok.to_str()


def write_tokenizer(dst: Path, vocab_size: int, context_length: int, style: str = "gpt2") -> None:
    """tokenizer.json and tokenizer_config.json (ChatML ``chat_template`` in it) into ``dst``.

    Written by transformers' own ``save_pretrained``, so the special tokens are recorded as
    the installed transformers records them; the template then moves from the separate
    ``chat_template.jinja`` that transformers 5 writes into tokenizer_config.json, where
    transformers 4 and other readers (vLLM, llama.cpp's converter) also look for it."""
    import transformers
    from tokenizers import Tokenizer

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(trained_tokenizer_json(vocab_size, style)),
        bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE, model_max_length=context_length,
        clean_up_tokenization_spaces=False)  # decode must give the bytes back, nothing tidied
    fast.save_pretrained(str(dst))
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML_TEMPLATE
    # The class a hub directory of the family names; "PreTrainedTokenizerFast" is the portable
    # generic one (transformers 5 maps it to its TokenizersBackend, 4 has it).
    cfg["tokenizer_class"] = "Qwen2Tokenizer" if style == "qwen2" else "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (dst / "chat_template.jinja").unlink(missing_ok=True)
