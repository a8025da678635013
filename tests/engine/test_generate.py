"""The generation loop against transformers' own ``generate``: greedy tokens identical for one
request, for requests sharing a continuous batch, cold and warm; seeded sampling reproducible;
priorities, cancellation, unload and overload. The real engine, real model directories.

With random weights greedy argmax is fragile (llm-serving.md section 8): every compared step's
top-1/top-2 margin in the reference must clear the noise (a left-padded batched decode differs
from batch 1 in the last bits), else the test fails saying so, never flakes.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from protocols.errors import BadRequest, LoadError, Overloaded
from protocols.generation import GenerationDelta, SamplingParams, TokenLogprob
from protocols.serving import ModelOptions, Priority
from cicada_async.engine.instance import ModelInstance
from cicada_async.engine.runtime import Engine

NOISE = 1e-4  # a margin below this fraction of the step's largest |logit| is too small to compare
LM_FAMILIES = ["tiny-llama", "tiny-llama-untied", "tiny-gpt2", "tiny-qwen2", "tiny-mistral"]


class IdCodec:
    """The tokenizer's part the loop uses, on token ids only: text is each id as ``<id>``.

    Stands in for ``textcodec.TextCodec`` (another module's work) so the loop is tested on
    directories without a tokenizer; limits and end-of-sequence ids come from config.json."""

    def __init__(self, model_dir: Path) -> None:
        cfg = json.loads((model_dir / "config.json").read_text())
        self.context_length = int(cfg.get("max_position_embeddings") or cfg["n_positions"])
        eos = cfg.get("eos_token_id")
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.vocab_size = int(cfg["vocab_size"])

    def token_logprob(self, token_id: int, logprob: float) -> TokenLogprob:
        text = f"<{token_id}>"
        return TokenLogprob(text, logprob, tuple(text.encode()))

    def detokenizer(self, stop: Sequence[str]) -> IdDetokenizer:
        return IdDetokenizer(stop)


class IdDetokenizer:
    def __init__(self, stop: Sequence[str]) -> None:
        self.stop, self.text, self.sent = tuple(stop), "", 0

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        self.text += "".join(f"<{t}>" for t in token_ids)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        end = min(hits) if hits else len(self.text)
        new, self.sent = self.text[self.sent:end], end
        return new, bool(hits)

    def flush(self) -> str:
        return ""


@pytest.fixture(scope="module")
def lm_dirs(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The catalogue's causal LMs, plus Qwen2 and Mistral written here with transformers."""
    import transformers

    root = tmp_path_factory.mktemp("lms")
    dirs = {k: model_dirs[k] for k in ("tiny-llama", "tiny-llama-untied", "tiny-gpt2")}
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128,
                  tie_word_embeddings=False, use_cache=False, bos_token_id=1, eos_token_id=2)
    for name, cfg_cls, model_cls in (("tiny-qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                     ("tiny-mistral", transformers.MistralConfig, transformers.MistralForCausalLM)):
        torch.manual_seed(3)
        model = model_cls(cfg_cls(**common)).eval()
        model.save_pretrained(root / name, safe_serialization=True)
        dirs[name] = root / name
    return dirs


@functools.lru_cache(maxsize=None)
def _hf_model(model_dir: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def hf_greedy(model_dir: Path, prompt: tuple[int, ...], max_new: int) -> list[int]:
    """transformers' greedy tokens; fails when a step's top-1/top-2 margin is within the noise."""
    model = _hf_model(model_dir)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new, use_cache=True, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=model.config.eos_token_id)
    tokens = out.sequences[0, len(prompt):].tolist()[:len(out.logits)]
    for k, logits in enumerate(out.logits):
        top = logits[0].topk(2).values
        if top[0] - top[1] < NOISE * float(logits[0].abs().max()):
            pytest.fail(f"margin too small to compare at step {k} of {model_dir.name} prompt {prompt}: "
                        f"{float(top[0] - top[1]):.3g}")
    return tokens


def prompts(n: int, seed: int, lengths: Sequence[int]) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, 1000, (lengths[i % len(lengths)],), generator=g).tolist()) for i in range(n)]


async def collect(inst: ModelInstance, codec: IdCodec, prompt: Sequence[int], params: SamplingParams,
                  priority: Priority = Priority.DEFAULT, seen: list[int] | None = None) -> list[GenerationDelta]:
    deltas = []
    async for d in inst.generation.generate(prompt, params, priority=priority, codec=codec):
        deltas.append(d)
        if seen is not None:
            seen.append(inst.generation_stats.running)
    return deltas


def tokens(deltas: list[GenerationDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


@pytest.mark.parametrize("name", LM_FAMILIES)
async def test_greedy_cold_then_warm_equals_transformers(lm_dirs, name):
    d = lm_dirs[name]
    codec = IdCodec(d)
    first, second = prompts(2, seed=11, lengths=[9, 4])
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        assert inst.state == "unloaded"
        cold = await collect(inst, codec, first, SamplingParams(max_tokens=24, temperature=0))
        assert inst.state == "ready" and inst.cold_starts == 1
        warm = await collect(inst, codec, second, SamplingParams(max_tokens=24, temperature=0))
        again = await collect(inst, codec, first, SamplingParams(max_tokens=24, temperature=0))
        assert inst.cold_starts == 1
    assert tokens(cold) == hf_greedy(d, first, 24)
    assert tokens(warm) == hf_greedy(d, second, 24)
    assert tokens(again) == tokens(cold)
    last = cold[-1]
    assert last.finish_reason in ("stop", "length") and all(x.finish_reason is None for x in cold[:-1])
    assert last.prompt_tokens == len(first) and last.completion_tokens == len(tokens(cold))
    assert "".join(x.text for x in cold) == "".join(f"<{t}>" for t in tokens(cold)
                                                    if t not in codec.eos_token_ids)


@pytest.mark.parametrize("name", ["tiny-llama-untied", "tiny-gpt2", "tiny-qwen2", "tiny-mistral"])
async def test_continuous_batch_equals_transformers(lm_dirs, name):
    """Six requests of different prompt lengths and max_tokens: three join a cold model, three
    more join the running batch after it has decoded, and they leave at different steps."""
    d = lm_dirs[name]
    codec = IdCodec(d)
    ps = prompts(6, seed=5, lengths=[3, 17, 8, 25, 5, 12])
    lengths = [20, 9, 30, 14, 25, 6]
    seen: list[int] = []
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(max_sequences=8))
        started = [asyncio.Event() for _ in ps]

        async def one(i: int) -> list[GenerationDelta]:
            out = []
            async for delta in inst.generation.generate(ps[i], SamplingParams(max_tokens=lengths[i], temperature=0),
                                                        priority=Priority.DEFAULT, codec=codec):
                out.append(delta)
                started[i].set()
                seen.append(inst.generation_stats.running)
            return out

        first = [asyncio.create_task(one(i)) for i in range(3)]
        await asyncio.gather(*(started[i].wait() for i in range(3)))
        await asyncio.sleep(0.05)  # a few decode steps later
        later = [asyncio.create_task(one(i)) for i in range(3, 6)]
        results = await asyncio.gather(*first, *later)
        stats = inst.generation_stats
    assert stats.running == 0 and stats.kv_cache_bytes_used == 0
    assert max(seen) >= 4, f"the requests never shared a batch (running counts {sorted(set(seen))})"
    for i, deltas in enumerate(results):
        assert tokens(deltas) == hf_greedy(d, ps[i], lengths[i]), f"request {i} (prompt of {len(ps[i])})"


async def test_prefill_failure_fails_that_sequence_only(lm_dirs):
    """A token id the tokenizer allows but the embedding lacks: its forward fails, the loop goes on."""
    d = lm_dirs["tiny-llama"]
    codec = IdCodec(d)
    codec.vocab_size = 5000  # a tokenizer larger than the embedding
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        with pytest.raises(Exception, match="forward failed"):
            await collect(inst, codec, [4000, 5], SamplingParams(max_tokens=4, temperature=0))
        ok = await collect(inst, codec, [7, 8, 9], SamplingParams(max_tokens=4, temperature=0))
    assert tokens(ok) == hf_greedy(d, (7, 8, 9), 4)


async def test_bad_requests(lm_dirs):
    d = lm_dirs["tiny-llama"]
    codec = IdCodec(d)
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(kv_cache_bytes=4096))
        n = codec.context_length
        with pytest.raises(BadRequest, match=rf"{n - 30} prompt tokens \+ max_tokens 40 = {n + 10} exceed "
                                             rf"the context length of m \({n} tokens\)"):
            await collect(inst, codec, [5] * (n - 30), SamplingParams(max_tokens=40))
        with pytest.raises(BadRequest, match="no tokens"):
            await collect(inst, codec, [], SamplingParams(max_tokens=4))
        with pytest.raises(BadRequest, match="token id 1000 is outside"):
            await collect(inst, codec, [5, 1000], SamplingParams(max_tokens=4))
        assert inst.state == "unloaded"  # refused before loading anything
        # 2 layers x 2 kv heads x 16 dims x 4 bytes x 2 = 512 bytes a token: 8 tokens fit 4096
        with pytest.raises(BadRequest, match="need 5120 bytes of KV cache; m's budget is 4096"):
            await collect(inst, codec, [5] * 6, SamplingParams(max_tokens=4))
        assert inst.generation_stats == type(inst.generation_stats)(0, 0, 0, 4096)
