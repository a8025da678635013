"""A cold burst's prefill keeps the process's peak RSS within the served weights + KV cache +
the runtime baseline + 10% (issue 26's memory target), however many prompts ride it.

A fresh process (its own allocator, set up as ``cicada serve`` sets it, and VmHWM) serves a Llama whose MLP is wide next to its
weights (hidden 128, intermediate 2048: 7 MiB of weights), warms up on it (imports, a first
load, one prompt of 512 tokens served, unload: the baseline is a process that has served), drops its file from the page cache (so the next load is the
pipelined one, with gates and a cold batch) and resets its peak (``/proc/self/clear_refs``),
then sends 8 prompts of 512 tokens at once. The oracle is the kernel's: VmHWM after the burst
against the VmRSS before it plus the safetensors bytes and the KV cache the burst needs. One
batched forward of 8 x 512 tokens holds 8 x 512 x 2048 fp32 = 32 MiB per MLP intermediate,
several at once, over a margin of about 37 MiB (10% of the baseline): 116-117 MiB over the
budget before the cold batch was split in forwards of ``PREFILL_CHUNK_TOKENS``; a forward of
512 tokens holds an eighth of that (28-38 MiB over the baseline in all, weights and KV included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BURST, TOKENS, MAX_TOKENS = 8, 512, 2

SCRIPT = r"""
import asyncio, json, sys
from pathlib import Path

from cicada_async.bench.pagecache import evict_checked
from cicada_async.engine.runtime import Engine
from cicada_async.service.enginesetup import few_malloc_arenas
from protocols.generation import SamplingParams
from protocols.serving import ModelOptions, Priority
from tests.engine.test_generate import IdCodec

few_malloc_arenas()  # as cicada serve sets up (before torch starts its threads)
model_dir, burst, tokens, max_tokens = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


async def main():
    codec = IdCodec(model_dir)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompts = [[3 + (i * 7 + r * 13) % 900 for i in range(tokens)] for r in range(burst)]

    async def one(inst, prompt):
        return [t for d in [x async for x in inst.generation.generate(prompt, params, priority=Priority.DEFAULT,
                                                                      codec=codec)] for t in d.token_ids]

    async with Engine() as engine:
        inst = engine.instance("m", str(model_dir), ModelOptions(max_sequences=burst))
        await one(inst, prompts[0])  # imports, a first load, one prompt of the same length served
        await inst.unload()
        evict_checked(model_dir)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        baseline = status("VmRSS")
        outs = await asyncio.gather(*(one(inst, p) for p in prompts))
        hwm = status("VmHWM")
        spans = [s.name for s in inst.last_timeline.spans if s.kind == "prefill"]
    print(json.dumps({"baseline": baseline, "hwm": hwm, "prefills": spans, "tokens": outs}))


asyncio.run(main())
"""


def wide_llama(dst: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=2048, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(dst))
    return dst


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_cold_burst_peak_rss_within_weights_kv_baseline(tmp_path):
    d = wide_llama(tmp_path / "wide-llama")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(d), str(BURST), str(TOKENS), str(MAX_TOKENS)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    # Cold batches carried the burst (one, unless the first closed before every request came).
    assert sum(int(name.split()[0]) for name in doc["prefills"]) == BURST, doc["prefills"]
    assert all(len(t) == MAX_TOKENS for t in doc["tokens"])
    weights = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv = BURST * (TOKENS + MAX_TOKENS) * 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
    budget = weights + kv + doc["baseline"]
    mib = 1 << 20
    assert doc["hwm"] <= 1.1 * budget, (
        f"peak {doc['hwm'] / mib:.0f} MiB > 1.1 x (weights {weights / mib:.0f} + KV {kv / mib:.0f} + baseline "
        f"{doc['baseline'] / mib:.0f} MiB) = {1.1 * budget / mib:.0f} MiB: "
        f"{(doc['hwm'] - budget) / mib:.0f} MiB over the budget")
