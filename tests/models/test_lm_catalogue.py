"""The catalogue's language models are hub-shaped directories transformers loads offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cicada_async.models.catalogue import ZOO, build_config, context_length, is_causal_lm, make_model
from cicada_async.models.tokenizer import CHATML_TEMPLATE, MAX_VOCAB, tokenizer_vocab_size, trained_tokenizer_json

LMS = sorted(n for n, e in ZOO.items() if is_causal_lm(e.architecture))
TINY_LMS = [n for n in LMS if n.startswith("tiny-")]
MIXED = "héllo wörld — 日本語 🎉\n\ttabs  and  spaces, Ünïcödé ∑∫ 한국어 🧑‍🚀"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any attempt to reach the hub fails instead of hanging or silently downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_the_families_the_issue_names_are_there() -> None:
    archs = {ZOO[n].architecture for n in TINY_LMS}
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel"} <= archs
    assert {"llama-1b", "llama-small", "gpt2", "gpt2-medium", "qwen2-small", "mistral-small"} <= set(LMS)


@pytest.mark.parametrize("name", TINY_LMS)
def test_tiny_lm_directory_loads_offline_and_generates(name: str, tmp_path: Path) -> None:
    import torch
    import transformers

    d = make_model(name, tmp_path / name, seed=3)
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((d / "config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHATML_TEMPLATE
    assert config["use_cache"] is False  # the V2 tensor path's setting, left as it was

    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()

    # the ids agree everywhere, and lie inside the embedding
    vocab = config["vocab_size"]
    assert len(tok) <= vocab
    assert tok.eos_token_id == config["eos_token_id"] == config["bos_token_id"]
    gen_eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert config["eos_token_id"] in gen_eos
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen_eos  # a chat turn ends the reply
    assert all(0 <= i < vocab for i in gen_eos)
    assert gen.get("do_sample", False) is False

    ids = tok.encode(MIXED)
    assert ids and max(ids) < vocab
    assert tok.decode(ids) == MIXED
    # The engine encodes with tokenizer.json itself; transformers may pick its own class for
    # the family (Qwen2Tokenizer for qwen2) and rebuild the pre-tokenizer: both must agree.
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    corpus = "".join(topics[k] for k in sorted(topics)[:10]) + MIXED + " 12345  x\r\n\n y's"
    assert tok.encode(corpus) == Tokenizer.from_file(str(d / "tokenizer.json")).encode(corpus).ids

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 🎉"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo 🎉<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.apply_chat_template(chat, tokenize=False).endswith("<|im_end|>\n")
    chat_ids = tok.encode(text, add_special_tokens=False)
    # the markers are single special tokens, not spelled out in bytes
    assert chat_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert chat_ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2

    prompt = torch.tensor([chat_ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                             min_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(chat_ids) + 4)
    assert int(out.max()) < vocab
    assert len(chat_ids) + 32 <= context_length(model.config)  # room for a chat prompt and a reply


@pytest.mark.parametrize("name", ["gpt2", "llama-small"])
def test_real_size_lm_directory_has_a_capped_tokenizer(name: str, tmp_path: Path) -> None:
    """gpt2 (vocab 50257, GPT2Config's eos 50256): the tokenizer is the corpus's 8192 tokens and
    the config's ids are the tokenizer's; llama-small's vocabulary is the tokenizer's own 8192
    (every id a model samples decodes to text: the generation benchmark times text chunks)."""
    import transformers

    d = make_model(name, tmp_path / name)
    config = json.loads((d / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert len(tok) == MAX_VOCAB
    assert config["vocab_size"] == (50257 if name == "gpt2" else MAX_VOCAB)
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eos_token_id == 0
    assert tok.decode(tok.encode(MIXED)) == MIXED


@pytest.mark.parametrize("name", LMS)
def test_every_lm_config_names_ids_inside_its_tokenizer(name: str) -> None:
    config = build_config(name)  # no weights: llama-1b would be 4 GB
    size = tokenizer_vocab_size(config.vocab_size)
    assert size <= config.vocab_size and size <= MAX_VOCAB
    assert config.eos_token_id < size and config.bos_token_id < size
    assert context_length(config) >= 128


def test_tokenizer_training_is_deterministic_across_processes() -> None:
    import subprocess
    import sys

    code = ("import hashlib; from cicada_async.models.tokenizer import trained_tokenizer_json as t; "
            "print(hashlib.sha256(t(1000).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           check=True, timeout=120)
    import hashlib

    assert child.stdout.strip() == hashlib.sha256(trained_tokenizer_json(1000).encode()).hexdigest()


def test_non_lm_entries_get_no_tokenizer(tmp_path: Path) -> None:
    d = make_model("tiny-bert", tmp_path / "bert")
    assert not (d / "tokenizer.json").exists()
