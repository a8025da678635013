"""The batched KV cache (engine/kvcache.py): left-padded rows, merged at joins, trimmed at
leaves, bytes counted as allocated; and the loop's admission keeping them within the budget."""

from __future__ import annotations

import asyncio

import pytest
import torch

from protocols.generation import GenerationDelta, SamplingParams
from protocols.serving import ModelOptions, Priority
from cicada_async.engine.kvcache import BatchCache, kv_shape, new_cache, tensors_bytes
from cicada_async.engine.runtime import Engine

from tests.engine.test_generate import IdCodec, hf_greedy, lm_dirs, prompts, tokens  # noqa: F401 (fixture)

H, D = 2, 4  # kv heads, head dim of the synthetic caches


def single(length: int, fill: float, layers: int = 2):
    """A prefilled one-row cache whose every real entry is ``fill`` (+ its column)."""
    cache = new_cache()
    cols = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1)
    for i in range(layers):
        k = (fill + cols).expand(1, H, length, D).contiguous()
        cache.update(k, -k, i)
    return cache


def test_join_left_pads_and_keep_trims():
    b = BatchCache()
    b.join(single(3, 100.0), 3)
    b.join(single(5, 200.0), 5)
    b.join(single(2, 300.0), 2)
    assert b.lengths == [3, 5, 2] and b.width == 5
    keys = b.cache.layers[1].keys
    assert keys.shape == (3, H, 5, D)
    assert keys[0, 0, :, 0].tolist() == [0, 0, 100, 101, 102]  # right-aligned, zeros before
    assert keys[1, 0, :, 0].tolist() == [200, 201, 202, 203, 204]
    assert keys[2, 0, :, 0].tolist() == [0, 0, 0, 300, 301]
    assert torch.equal(b.cache.layers[0].values, -b.cache.layers[0].keys)
    assert b.nbytes() == 2 * 2 * 3 * H * 5 * D * 4  # layers x (k, v) x rows x heads x width x dims x fp32
    mask, positions = b.step_inputs(torch.device("cpu"))
    assert positions.view(-1).tolist() == [3, 5, 2]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    # The longest row leaves: two leading columns are padding in every row left, and go.
    b.keep([0, 2])
    assert b.lengths == [3, 2] and b.cache.layers[0].keys.shape == (2, H, 3, D)
    assert b.cache.layers[0].keys[:, 0, :, 0].tolist() == [[100, 101, 102], [0, 300, 301]]
    assert b.nbytes() == 2 * 2 * 2 * H * 3 * D * 4  # the trimmed storage, not a view of the old one
    b.keep([])
    assert b.rows == 0 and b.nbytes() == 0 and b.cache is None


def test_rows_without_padding_need_no_mask():
    b = BatchCache()
    b.join(single(4, 1.0), 4)
    b.join(single(4, 2.0), 4)
    mask, positions = b.step_inputs(torch.device("cpu"))
    assert mask is None and positions.view(-1).tolist() == [4, 4]


def test_tensors_bytes_counts_storage_once():
    cache = single(6, 0.0, layers=1)
    assert tensors_bytes(cache) == 2 * H * 6 * D * 4
    assert tensors_bytes(None) == 0


def test_kv_shape_of_the_families():
    import transformers

    llama = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    s = kv_shape(llama, torch.float32)
    assert (s.layers, s.kv_heads, s.head_dim, s.token_bytes, s.context_cap) == (3, 2, 16, 2 * 3 * 2 * 16 * 4, None)
    gpt2 = kv_shape(transformers.GPT2Config(n_embd=64, n_head=2, n_layer=2), torch.bfloat16)
    assert (gpt2.kv_heads, gpt2.head_dim, gpt2.token_bytes) == (2, 32, 2 * 2 * 2 * 32 * 2)
    qwen = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    assert kv_shape(qwen, torch.float32).context_cap is None  # use_sliding_window is off
    mistral = transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, sliding_window=64)
    assert kv_shape(mistral, torch.float32).context_cap == 64


async def test_admission_keeps_the_padded_cache_within_the_budget(lm_dirs):
    """A budget for about two rows: the others wait, the allocation never exceeds it, and the
    tokens are still transformers' (rows joining and leaving around each other)."""
    d = lm_dirs["tiny-llama-untied"]
    codec = IdCodec(d)
    token_bytes = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32
    budget = 2 * 40 * token_bytes
    ps = prompts(5, seed=41, lengths=[5, 12, 8, 3, 10])
    n = [20, 12, 25, 30, 16]
    used: list[int] = []
    waiting: list[int] = []
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(kv_cache_bytes=budget, max_sequences=8))

        async def one(i: int) -> list[GenerationDelta]:
            out = []
            async for x in inst.generation.generate(ps[i], SamplingParams(max_tokens=n[i], temperature=0),
                                                    priority=Priority.DEFAULT, codec=codec):
                out.append(x)
                stats = inst.generation_stats
                used.append(stats.kv_cache_bytes_used)
                waiting.append(stats.waiting)
            return out

        results = await asyncio.gather(*(one(i) for i in range(5)))
        assert inst.generation_stats.kv_cache_bytes_used == 0
    assert max(used) <= budget and max(used) > budget // 4
    assert max(waiting) > 0
    for i, deltas in enumerate(results):
        assert tokens(deltas) == hf_greedy(d, ps[i], n[i]), f"request {i}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_reported_bytes_are_whole_tokens_of_the_config(lm_dirs, dtype):
    """One row of n tokens holds n x the config's per-token bytes, in the served dtype."""
    d = lm_dirs["tiny-qwen2"]
    codec = IdCodec(d)
    token_bytes = 2 * 2 * 2 * 16 * (4 if dtype == "float32" else 2)
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions(dtype=dtype))
        agen = inst.generation.generate([5] * 9, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True),
                                        priority=Priority.DEFAULT, codec=codec)
        await agen.__anext__()
        used = inst.generation_stats.kv_cache_bytes_used
        assert used % token_bytes == 0 and 9 <= used // token_bytes < 9 + 50
        assert inst.generation.reserved_bytes == (9 + 50) * token_bytes
        await agen.aclose()
        assert inst.generation.reserved_bytes == 0 and inst.generation_stats.kv_cache_bytes_used == 0


def test_join_all_merges_rows_in_one_copy_and_frees_the_old_tensors():
    """Several rows joining at one step are stacked once per layer; the old batch's tensors and
    the rows' go as the merge goes (weakrefs: nothing keeps them), and the result is what
    joining them one by one gives."""
    import weakref

    b, ref = BatchCache(), BatchCache()
    for c, n in ((single(3, 100.0), 3), (single(1, 200.0), 1)):
        b.join(c, n)
    for c, n in ((single(3, 100.0), 3), (single(1, 200.0), 1), (single(5, 300.0), 5), (single(2, 400.0), 2)):
        ref.join(c, n)
    old = weakref.ref(b.cache.layers[0].keys)
    rows = [(single(5, 300.0), 5), (single(2, 400.0), 2)]
    row_keys = [weakref.ref(c.layers[1].keys) for c, _ in rows]
    b.join_all(rows)
    assert b.lengths == [3, 1, 5, 2]
    for mine, theirs in zip(b.cache.layers, ref.cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert b.cache.layers[1].keys[:, 0, :, 0].tolist() == [[0, 0, 100, 101, 102], [0, 0, 0, 0, 200],
                                                           [300, 301, 302, 303, 304], [0, 0, 0, 400, 401]]
    del rows
    assert old() is None and all(r() is None for r in row_keys)
    assert b.nbytes() == 2 * 2 * 4 * H * 5 * D * 4
