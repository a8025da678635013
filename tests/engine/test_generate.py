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

from protocols.errors import BadRequest, InferenceError, LoadError, Overloaded
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
        gen = model_dir / "generation_config.json"  # what transformers' generate stops on
        eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else cfg.get("eos_token_id")
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
    """The catalogue's causal LMs (hub-shaped directories with a tokenizer)."""
    from cicada_async.models.catalogue import make_model

    root = tmp_path_factory.mktemp("lms")
    dirs = {k: model_dirs[k] for k in ("tiny-llama", "tiny-llama-untied", "tiny-gpt2")}
    for name in ("tiny-qwen2", "tiny-mistral"):
        dirs[name] = make_model(name, root / name, seed=1)
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
    """Through the served model's API (``ModelInstance.generate``, the directory's tokenizer):
    the first request cold-starts the model, the later ones find it warm."""
    d = lm_dirs[name]
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        codec = await inst.prompt_codec()
        assert inst.state == "unloaded"  # the tokenizer is read without the weights
        first, second = codec.encode("The quick brown fox"), codec.encode("import sys")
        params = SamplingParams(max_tokens=24, temperature=0)
        cold = [x async for x in inst.generate(first, params, priority=Priority.DEFAULT)]
        assert inst.state == "ready" and inst.cold_starts == 1
        warm = [x async for x in inst.generate(second, params, priority=Priority.DEFAULT)]
        again = [x async for x in inst.generate(first, params, priority=Priority.DEFAULT)]
        assert inst.cold_starts == 1
        stats = inst.generation_stats
    assert tokens(cold) == hf_greedy(d, tuple(first), 24)
    assert tokens(warm) == hf_greedy(d, tuple(second), 24)
    assert tokens(again) == tokens(cold)
    last = cold[-1]
    assert last.finish_reason in ("stop", "length") and all(x.finish_reason is None for x in cold[:-1])
    assert last.prompt_tokens == len(first) and last.completion_tokens == len(tokens(cold))
    assert "".join(x.text for x in cold) == codec.decode(tokens(cold))
    assert stats.running == stats.waiting == stats.kv_cache_bytes_used == 0
    assert stats.kv_cache_bytes_budget == inst.options.kv_cache_bytes


async def test_models_that_do_not_generate_refuse(model_dirs):
    async with Engine() as engine:
        inst = engine.instance("m", str(model_dirs["tiny-bert"]))
        with pytest.raises(BadRequest, match="does not generate text"):
            [x async for x in inst.generate([1, 2], SamplingParams(max_tokens=2), priority=Priority.DEFAULT)]
        await asyncio.sleep(0)
        assert inst.generation_stats.kv_cache_bytes_budget == 0 and inst.state == "unloaded"


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
                if len(tokens(out)) >= 5 or delta.finish_reason:  # joined, a few decode steps done
                    started[i].set()
                seen.append(inst.generation_stats.running)
            return out

        first = [asyncio.create_task(one(i)) for i in range(3)]
        await started[2].wait()  # the longest of them (30) has 25 tokens to go: the others join it
        later = [asyncio.create_task(one(i)) for i in range(3, 6)]
        results = await asyncio.gather(*first, *later)
        stats = inst.generation_stats
    assert stats.running == 0 and stats.kv_cache_bytes_used == 0
    assert max(seen) >= 4, f"the requests never shared a batch (running counts {sorted(set(seen))})"
    for i, deltas in enumerate(results):
        assert tokens(deltas) == hf_greedy(d, ps[i], lengths[i]), f"request {i} (prompt of {len(ps[i])})"


async def test_forward_failures_fail_their_step_only(lm_dirs):
    """A tokenizer that claims more than the model has: a token id past the embedding fails its
    prefill, a position past GPT-2's table fails a decode step (its rows); the loop goes on."""
    d = lm_dirs["tiny-gpt2"]  # 128 positions
    codec = IdCodec(d)
    codec.vocab_size, codec.context_length = 5000, 1000
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        with pytest.raises(InferenceError, match="forward failed"):
            await collect(inst, codec, [4000, 5], SamplingParams(max_tokens=4, temperature=0))
        with pytest.raises(InferenceError, match="forward failed"):
            await collect(inst, codec, [5] * 120, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        assert inst.generation_stats.running == 0 and inst.generation_stats.kv_cache_bytes_used == 0
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


async def _until(cond, timeout: float = 10.0) -> None:
    """Yield to the loop until ``cond()`` holds (bounded: a bug fails, never hangs)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


def long_params(n: int = 120) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


async def test_more_urgent_waiting_sequence_is_admitted_first(lm_dirs):
    d = lm_dirs["tiny-llama-untied"]
    codec = IdCodec(d)
    order: list[str] = []
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(max_sequences=1))

        async def one(tag: str, priority: int) -> None:
            async for _ in inst.generation.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0),
                                                    priority=Priority(priority), codec=codec):
                if tag not in order:
                    order.append(tag)

        agen = inst.generation.generate([3, 4], long_params(250), priority=Priority(10), codec=codec)
        await agen.__anext__()  # A runs: the one batch slot is taken
        late = asyncio.create_task(one("late, less urgent", 20))
        await _until(lambda: inst.generation_stats.waiting == 1)
        urgent = asyncio.create_task(one("later, more urgent", 2))
        await _until(lambda: inst.generation_stats.waiting == 2)
        assert inst.generation_stats.running == 1 and order == []
        async for _ in agen:
            pass
        await asyncio.gather(late, urgent)
    assert order == ["later, more urgent", "late, less urgent"]


async def test_closing_early_frees_the_kv_cache_at_once(lm_dirs):
    """aclose() and a cancelled consumer: running, waiting and KV bytes drop when they return;
    the sequence that stays keeps generating exactly."""
    d = lm_dirs["tiny-llama-untied"]
    codec = IdCodec(d)
    keep_prompt = prompts(1, seed=21, lengths=[6])[0]
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(max_sequences=2))
        # Generates until closed (to the context's end): it is still running in every phase.
        stays = inst.generation.generate(keep_prompt, long_params(codec.context_length - 6),
                                         priority=Priority.DEFAULT, codec=codec)
        kept = list((await stays.__anext__()).token_ids)
        gone = inst.generation.generate([9] * 30, long_params(), priority=Priority.DEFAULT, codec=codec)
        for _ in range(3):
            await gone.__anext__()
        both = inst.generation_stats
        assert both.running == 2 and both.kv_cache_bytes_used > 0
        await gone.aclose()
        after = inst.generation_stats
        assert after.running == 1 and after.kv_cache_bytes_used < both.kv_cache_bytes_used
        # A consumer task cancelled while it waits for its next token.
        got = asyncio.Event()

        async def consume() -> None:
            async for _ in inst.generation.generate([8] * 40, long_params(), priority=Priority.DEFAULT, codec=codec):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        assert inst.generation_stats.running == 2
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert inst.generation_stats.running == 1
        # And one cancelled while it waits for a slot: it leaves the waiting line.
        waiter = asyncio.create_task(consume())
        await _until(lambda: inst.generation_stats.running == 2)
        third = asyncio.create_task(collect(inst, codec, [4, 4], SamplingParams(max_tokens=2)))
        await _until(lambda: inst.generation_stats.waiting == 1)
        third.cancel()
        await asyncio.gather(third, return_exceptions=True)
        assert inst.generation_stats.waiting == 0
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        while len(kept) < 40:
            kept += (await stays.__anext__()).token_ids
        await stays.aclose()
        final = inst.generation_stats
        assert final.running == 0 and final.waiting == 0 and final.kv_cache_bytes_used == 0
    ref = hf_greedy(d, keep_prompt, 40)
    assert kept[:len(ref)] == ref  # (the reference may stop early, at an end-of-sequence token)


async def test_unload_fails_running_and_waiting_sequences_promptly(lm_dirs):
    d = lm_dirs["tiny-llama-untied"]
    codec = IdCodec(d)
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(max_sequences=1))
        running = asyncio.create_task(collect(inst, codec, [3, 4], long_params(200)))
        await _until(lambda: inst.generation_stats.running == 1)
        waiting = asyncio.create_task(collect(inst, codec, [5, 6], long_params(10)))
        await _until(lambda: inst.generation_stats.waiting == 1)
        async with asyncio.timeout(5):
            await inst.unload()
            results = await asyncio.gather(running, waiting, return_exceptions=True)
        for r in results:
            assert isinstance(r, LoadError) and str(r) == "model m was unloaded", r
        assert inst.generation_stats == type(inst.generation_stats)(0, 0, 0, inst.options.kv_cache_bytes)
        # The next request cold-starts the model again.
        again = await collect(inst, codec, [7, 8, 9], SamplingParams(max_tokens=4, temperature=0))
        assert inst.cold_starts == 2 and tokens(again) == hf_greedy(d, (7, 8, 9), 4)


async def test_overloaded_when_the_waiting_line_is_full(lm_dirs):
    d = lm_dirs["tiny-llama-untied"]
    codec = IdCodec(d)
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(max_sequences=1))  # 4 may wait
        tasks = [asyncio.create_task(collect(inst, codec, [3, 4], long_params(200)))]
        await _until(lambda: inst.generation_stats.running == 1)
        tasks += [asyncio.create_task(collect(inst, codec, [5, i], long_params(5))) for i in range(4)]
        await _until(lambda: inst.generation_stats.waiting == 4)
        with pytest.raises(Overloaded) as e:
            await collect(inst, codec, [5, 6], long_params(5))
        assert e.value.retry_after_s > 0 and inst.generation_stats.waiting == 4
        await inst.unload()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_stop_string_and_logprobs(lm_dirs):
    """A stop string ends the text before it (the row leaves); logprobs are the raw model's."""
    d = lm_dirs["tiny-llama-untied"]
    codec = IdCodec(d)
    prompt = prompts(1, seed=31, lengths=[7])[0]
    ref = hf_greedy(d, prompt, 12)
    stop_at = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    model = _hf_model(d)
    with torch.inference_mode():
        raw = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        deltas = await collect(inst, codec, prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=3,
                                                                  stop=(f"<{ref[stop_at]}>",)))
        assert inst.generation_stats.running == 0
    assert tokens(deltas) == ref[:stop_at + 1]  # the stop string's token was computed
    assert "".join(x.text for x in deltas) == "".join(f"<{t}>" for t in ref[:stop_at])
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == stop_at + 1
    steps = [s for x in deltas for s in x.logprobs]
    assert len(steps) == stop_at + 1
    first = steps[0]
    assert first.chosen.token == f"<{ref[0]}>" and len(first.top) == 3
    assert first.top[0].token == first.chosen.token  # greedy: the chosen is the most likely
    assert first.chosen.logprob == pytest.approx(float(raw[ref[0]]), abs=1e-5)
    assert [t.logprob for t in first.top] == sorted((t.logprob for t in first.top), reverse=True)


async def test_stop_string_with_the_models_tokenizer(lm_dirs):
    """A stop string (it may span tokens) ends the streamed text right before it."""
    d = lm_dirs["tiny-llama-untied"]
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        codec = await inst.prompt_codec()
        prompt = codec.encode("def main():")
        full = [x async for x in inst.generate(prompt, SamplingParams(max_tokens=30, temperature=0),
                                               priority=Priority.DEFAULT)]
        text = "".join(x.text for x in full)
        assert len(text) > 12, text
        stop = text[len(text) // 2:len(text) // 2 + 3]
        cut = [x async for x in inst.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=(stop,)),
                                              priority=Priority.DEFAULT)]
        assert inst.generation_stats.running == 0
    assert "".join(x.text for x in cut) == text[:text.index(stop)]
    assert cut[-1].finish_reason == "stop" and tokens(cut) == tokens(full)[:len(tokens(cut))]
