"""Sampling (engine/sampling.py): greedy, penalties, temperature, top-k, top-p, seeds, logprobs;
and seeded sampling through the generation loop, the same alone and in a continuous batch.

Sampling tests need a decisive distribution: a random model's is near uniform, so the model here
has its output head scaled by 50 (llm-serving.md section 8).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from protocols.generation import SamplingParams
from protocols.serving import ModelOptions
from cicada_async.engine.runtime import Engine
from cicada_async.engine.sampling import RowSampler, choose, filtered, penalize

from tests.engine.test_generate import IdCodec, collect, prompts, tokens

CPU = torch.device("cpu")


def rows(*params: SamplingParams) -> list[RowSampler]:
    return [RowSampler(p, CPU) for p in params]


def test_greedy_is_argmax_first_index_on_ties():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1
    got = [c.token for c in choose(logits, rows(*[SamplingParams(max_tokens=1, temperature=0)] * 4))]
    assert got == logits.argmax(dim=-1).tolist() and got[2] == 7


def test_penalties_are_openais():
    row = RowSampler(SamplingParams(max_tokens=9, temperature=0, presence_penalty=0.5, frequency_penalty=0.25), CPU)
    for t in (3, 3, 5):
        row.add(t)
    logits = torch.zeros(8)
    out = penalize(logits, row)
    assert out[3] == pytest.approx(-(0.5 + 2 * 0.25)) and out[5] == pytest.approx(-(0.5 + 0.25))
    assert out[[0, 1, 2, 4, 6, 7]].eq(0).all() and logits.eq(0).all()  # a copy
    # Greedy with penalties: the repeated token loses its lead.
    logits = torch.tensor([0.0, 0.0, 0.0, 1.2, 0.0, 1.1, 0.0, 0.0])  # 3: 0.2 after, 5: 0.35
    assert choose(logits.unsqueeze(0), [row])[0].token == 5


def test_top_k_and_top_p_cut():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filtered(logits, SamplingParams(max_tokens=1, top_k=2)).isfinite().tolist()
    assert kept == [True, True, False, False]
    # top_p 0.8: 0.5 + 0.3 reach it, the rest is cut; 0.81 needs the third token too.
    assert filtered(logits, SamplingParams(max_tokens=1, top_p=0.8)).isfinite().tolist() == [True, True, False, False]
    assert filtered(logits, SamplingParams(max_tokens=1, top_p=0.81)).isfinite().tolist() == [True, True, True, False]
    # The most likely token always stays.
    assert filtered(logits, SamplingParams(max_tokens=1, top_p=0.01)).isfinite().tolist() == [True, False, False, False]
    # Over many draws only the kept tokens come out, each of them at some point.
    row = RowSampler(SamplingParams(max_tokens=1, top_k=3, temperature=1.0, seed=1), CPU)
    seen = {choose(logits.unsqueeze(0), [row])[0].token for _ in range(300)}
    assert seen == {0, 1, 2}


def test_seeded_rows_draw_the_same_alone_or_batched():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, generator=g)
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=42)
    alone = rows(p)
    solo = [choose(logits[1:2], alone)[0].token for _ in range(20)]
    batched = rows(SamplingParams(max_tokens=1, temperature=0.7, seed=1), p, SamplingParams(max_tokens=1, temperature=0))
    together = [choose(logits, batched)[1].token for _ in range(20)]
    assert solo == together and len(set(solo)) > 1


def test_logprobs_are_the_raw_log_softmax():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(max_tokens=1, temperature=1.5, top_k=2, logprobs=3, presence_penalty=1.0, seed=9)
    row = rows(params)[0]
    row.add(int(logits[0].argmax()))  # a penalty that the reported logprobs must not show
    c = choose(logits[:1], [row])[0]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert c.logprob == pytest.approx(float(raw[c.token]))
    assert [i for i, _ in c.top] == raw.topk(3).indices.tolist()
    assert [lp for _, lp in c.top] == pytest.approx(raw.topk(3).values.tolist())
    assert choose(logits[:1], rows(SamplingParams(max_tokens=1)))[0].logprob is None


@pytest.fixture(scope="module")
def decisive_dir(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama-untied with its output head x50: sampling then picks among a few tokens."""
    from safetensors.torch import load_file, save_file

    src = model_dirs["tiny-llama-untied"]
    dst = tmp_path_factory.mktemp("decisive") / "m"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 50
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((dst / "config.json").read_text())["tie_word_embeddings"] is False
    return dst


async def test_seeded_sampling_reproducible_alone_and_in_a_batch(decisive_dir):
    codec = IdCodec(decisive_dir)
    prompt = prompts(1, seed=8, lengths=[6])[0]
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    async with Engine() as engine:
        inst = engine.instance("m", str(decisive_dir), ModelOptions(max_sequences=6))
        alone = tokens(await collect(inst, codec, prompt, params))
        again = tokens(await collect(inst, codec, prompt, params))
        # In a batch: others (other seeds, prompts, settings) before and after it joins.
        others = [asyncio.create_task(collect(inst, codec, p, SamplingParams(
            max_tokens=30, temperature=1.0, seed=i, ignore_eos=True))) for i, p in enumerate(prompts(3, 9, [4, 11, 7]))]
        await asyncio.sleep(0.01)
        mine = asyncio.create_task(collect(inst, codec, prompt, params))
        more = [asyncio.create_task(collect(inst, codec, p, SamplingParams(max_tokens=10, temperature=0.5, seed=99)))
                for p in prompts(2, 10, [3, 9])]
        batched = tokens(await mine)
        await asyncio.gather(*others, *more)
        other_seed = tokens(await collect(inst, codec, prompt, SamplingParams(
            max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=4321, ignore_eos=True)))
    assert alone == again == batched
    assert other_seed != alone
    assert len(set(alone)) > 3  # really sampled, not one token over and over
