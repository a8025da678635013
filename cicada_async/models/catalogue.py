"""The catalogue behind ``cicada make-model``: real architectures with random weights.

Nothing is downloaded: each entry is a config (transformers) or a factory (plain PyTorch), built
with its default random initialization and saved as safetensors in a model directory.

Causal language models (``*ForCausalLM``, ``*LMHeadModel``: the Llama, Qwen2, Mistral and GPT-2
families) are written as a user has them from the hub: config.json, safetensors,
tokenizer.json and tokenizer_config.json with a ChatML ``chat_template`` (a byte-level BPE
trained locally, ``cicada_async.models.tokenizer``), and generation_config.json. Their
bos/eos ids are the tokenizer's ``<|endoftext|>`` (id 0; GPT2Config's default 50256 lies
outside a small vocabulary), and generation_config.json also ends at ``<|im_end|>`` (id 2) so
a chat reply stops at the end of its turn, as Qwen2's instruct models do. ``pad_token_id`` stays
unset in config.json: Llama-style models zero the embedding row of the pad id at init, which
would change the weights these entries have always had; generation_config.json names it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cicada_async.models.tokenizer import (
    ENDOFTEXT_ID,
    IM_END_ID,
    tokenizer_vocab_size,
    write_tokenizer,
)
from protocols.errors import ConfigError


@dataclass(frozen=True)
class ZooEntry:
    """A named model: a transformers config or a plain-PyTorch factory and its arguments."""

    architecture: str
    model_type: str | None = None  # transformers model_type; None for factories
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)  # factories declare their inputs


_TEXT = {"use_cache": False}
# The benchmark LMs' vocabulary is their tokenizer's (8192 tokens, what the locally trained BPE
# reaches; tokenizer.py): with 32000 rows, random weights sampled ids past the tokenizer's
# 75% of the time, which decode to no text, so a stream had no chunk to time.
_LM_VOCAB = 8192
# llama-small's shape, for the other decoder families
_SMALL_LM = dict(_TEXT, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=_LM_VOCAB,
                 max_position_embeddings=2048)
_TINY_LM = dict(_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                max_position_embeddings=256)
ZOO: dict[str, ZooEntry] = {
    # real sizes
    "gpt2": ZooEntry("GPT2LMHeadModel", "gpt2", dict(_TEXT)),
    "gpt2-medium": ZooEntry("GPT2LMHeadModel", "gpt2", dict(_TEXT, n_embd=1024, n_layer=24, n_head=16)),
    "bert-base": ZooEntry("BertModel", "bert", dict(_TEXT)),
    "resnet-50": ZooEntry("ResNetForImageClassification", "resnet", {}),
    "vit-base": ZooEntry("ViTModel", "vit", {}),
    "llama-small": ZooEntry("LlamaForCausalLM", "llama", dict(
        _TEXT, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, vocab_size=_LM_VOCAB,
        max_position_embeddings=2048, tie_word_embeddings=False)),
    "llama-1b": ZooEntry("LlamaForCausalLM", "llama", dict(
        _TEXT, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=_LM_VOCAB,
        max_position_embeddings=2048, tie_word_embeddings=False)),
    "qwen2-small": ZooEntry("Qwen2ForCausalLM", "qwen2", dict(
        _SMALL_LM, tie_word_embeddings=True)),
    "mistral-small": ZooEntry("MistralForCausalLM", "mistral", dict(
        _SMALL_LM, tie_word_embeddings=False)),
    # tiny variants for tests
    "tiny-gpt2": ZooEntry("GPT2LMHeadModel", "gpt2", dict(
        # n_positions stays 128: a longer position table would change every weight after it
        _TEXT, bos_token_id=0, eos_token_id=0, n_embd=64, n_layer=2, n_head=2, vocab_size=1000, n_positions=128)),
    "tiny-bert": ZooEntry("BertModel", "bert", dict(
        _TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=128)),
    # question answering: [batch, seq] outputs (start_logits, end_logits), padded batches
    "tiny-bert-qa": ZooEntry("BertForQuestionAnswering", "bert", dict(
        _TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=128)),
    # RoBERTa: position ids counted from the pad token (1), the family whose cold answer drifted
    "tiny-roberta": ZooEntry("RobertaModel", "roberta", dict(
        _TEXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, vocab_size=1000, max_position_embeddings=130)),
    "tiny-resnet": ZooEntry("ResNetForImageClassification", "resnet", dict(
        embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
        num_labels=10, image_size=32)),
    "tiny-vit": ZooEntry("ViTModel", "vit", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        image_size=32, patch_size=8)),
    # rotary positions have no weights: 256 positions (a chat prompt and a reply) cost nothing
    "tiny-llama": ZooEntry("LlamaForCausalLM", "llama", dict(_TINY_LM, tie_word_embeddings=True)),
    "tiny-llama-untied": ZooEntry("LlamaForCausalLM", "llama", dict(_TINY_LM, tie_word_embeddings=False)),
    "tiny-qwen2": ZooEntry("Qwen2ForCausalLM", "qwen2", dict(_TINY_LM, tie_word_embeddings=True)),
    "tiny-mistral": ZooEntry("MistralForCausalLM", "mistral", dict(_TINY_LM, tie_word_embeddings=False)),
    "tiny-convnet": ZooEntry(
        "cicada_async.models.plain:ConvNet", None, {"channels": 3, "width": 8, "classes": 10},
        {"x": {"shape": [-1, 3, 16, 16], "dtype": "float32"}}),
    "tiny-mlp": ZooEntry(
        "cicada_async.models.plain:TiedMLP", None, {"vocab": 256, "dim": 32, "hidden": 64},
        {"input_ids": {"shape": [-1, -1], "dtype": "int64"}}),
}


def _randomize_running_stats(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Default BatchNorm statistics (0 and 1) would hide a load that forgot them.
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None \
                and m.running_var is not None:
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(1000)


def make_model(
    name: str,
    dst: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write model ``name`` with random weights into directory ``dst`` (created)."""
    entry = ZOO.get(name)
    if entry is None:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(ZOO))}")
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype) if dtype else None
    if entry.model_type is None:
        from cicada_async.engine.modeldir import _import_factory

        factory: Callable[..., torch.nn.Module] = _import_factory(entry.architecture)
        model = factory(**entry.config).eval()
        _randomize_running_stats(model, gen)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        (out / "cicada.json").write_text(json.dumps(
            {"factory": entry.architecture, "kwargs": entry.config, "inputs": entry.inputs},
            indent=2))
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"))
        return out

    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = build_config(name)
    model = getattr(transformers, entry.architecture)._from_config(config).eval()
    _randomize_running_stats(model, gen)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if is_causal_lm(entry.architecture):
        # Replaces the one save_pretrained would derive from config.json, which carries
        # use_cache: false (the V2 tensor path wants logits only) into every generate().
        model.generation_config = transformers.GenerationConfig(
            bos_token_id=ENDOFTEXT_ID, eos_token_id=[ENDOFTEXT_ID, IM_END_ID],
            pad_token_id=ENDOFTEXT_ID, do_sample=False)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_bytes:
        kwargs["max_shard_size"] = max_shard_bytes
    model.save_pretrained(str(out), **kwargs)
    if is_causal_lm(entry.architecture):
        write_tokenizer(out, tokenizer_vocab_size(config.vocab_size), context_length(config),
                        "qwen2" if entry.model_type == "qwen2" else "gpt2")
    return out


def is_causal_lm(architecture: str) -> bool:
    """Whether a transformers class name is a text generator (the loop's and the codec's test)."""
    return architecture.endswith(("ForCausalLM", "LMHeadModel"))


def context_length(config: Any) -> int:
    """A text config's context: ``max_position_embeddings``, or GPT-2's ``n_positions``."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"{type(config).__name__} names no context length")


def build_config(name: str) -> Any:
    """The transformers config ``make_model`` writes for entry ``name`` (no weights built)."""
    import transformers

    entry = ZOO[name]
    if entry.model_type is None:
        raise ConfigError(f"{name} is a plain PyTorch factory, it has no transformers config")
    config = transformers.AutoConfig.for_model(entry.model_type, **entry.config)
    config.architectures = [entry.architecture]
    if is_causal_lm(entry.architecture):
        # the tokenizer's ids; bos/eos ids touch no weight (unlike pad_token_id)
        config.bos_token_id = config.eos_token_id = ENDOFTEXT_ID
    return config
