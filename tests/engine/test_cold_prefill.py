"""The first prefill of a cold LLM rides its load (``engine/coldprefill.py``): every sequence
that arrives during the load is prefilled in one padded batch through the gated model, layer by
layer as the weights land, and its tokens equal transformers' greedy ones.

The weights come over a bandwidth-capped HTTP link (an aiohttp origin behind the fault proxy),
so the load takes long enough for the overlap to be seen in the load's timeline: the first
decoder layer computes before the last weight bytes arrive. A first load (then unloaded)
learns the plan, as a plan file does: without it a tiny model's first reads are a few large
ones in file order, and the embedding (last in GPT-2's file) lands with everything else. The oracle for the tokens is
transformers' ``generate`` on the same directory (``test_generate.hf_greedy``, margins checked).
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from protocols.errors import LoadError
from protocols.generation import GenerationDelta, SamplingParams
from protocols.serving import ModelOptions, Priority
from cicada_async.engine import coldprefill
from cicada_async.engine.coldprefill import forwards_of
from cicada_async.engine.runtime import Engine
from tests.engine.test_generate import IdCodec, hf_greedy, lm_dirs, prompts, tokens  # noqa: F401 - lm_dirs: a fixture

HTTP: dict[str, Any] = {"chunk_bytes": 16 << 10, "concurrency": 2, "connect_timeout_s": 2, "read_timeout_s": 5,
                        "max_attempts": 3, "backoff_s": 0.01, "backoff_max_s": 0.05}
BANDWIDTH = 512 << 10  # bytes/s: a tiny model (~0.3-0.6 MB) takes about a second to arrive


async def slow_copy(model_dir: Path, served_root: Path, origin: str, fault_proxy_factory: Any) -> str:
    """The model's files on the origin, behind a link of BANDWIDTH: the URI to load it from."""
    directory = served_root / f"cold-prefill-{uuid.uuid4().hex[:10]}"
    shutil.copytree(model_dir, directory)
    proxy = await fault_proxy_factory(origin, bandwidth_bps=BANDWIDTH)
    return f"{proxy.url}/{directory.name}/"


def engine(plans: Path) -> Engine:
    # Plans of remote models go to a plan directory; the session's is shared with
    # test_plan_cache, whose first cold starts of the same weights must find none.
    return Engine(storage={"http": HTTP}, read_bytes=16 << 10, load_timeout_s=60.0, plan_dir=plans)


async def one(inst: Any, codec: IdCodec, prompt: tuple[int, ...], n: int) -> list[GenerationDelta]:
    params = SamplingParams(max_tokens=n, temperature=0)
    return [d async for d in inst.generation.generate(prompt, params, priority=Priority.DEFAULT, codec=codec)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-untied", "tiny-gpt2", "tiny-qwen2"])
async def test_cold_burst_rides_one_pipelined_prefill(lm_dirs, name, served_root, aiohttp_origin, fault_proxy_factory,
                                                      tmp_path):
    d = lm_dirs[name]
    codec = IdCodec(d)
    ps = prompts(6, seed=11, lengths=[3, 17, 8, 25, 5, 12])
    lengths = [12, 5, 16, 9, 14, 7]
    uri = await slow_copy(d, served_root, aiohttp_origin, fault_proxy_factory)
    async with asyncio.timeout(60):
        async with engine(tmp_path / "plans") as eng:
            inst = eng.instance("m", uri, ModelOptions(max_sequences=8))
            await inst.load()  # a first load learns the plan (execution order), as a plan file would
            await inst.unload()
            results = await asyncio.gather(*(one(inst, codec, p, n) for p, n in zip(ps, lengths)))
            timeline = inst.last_timeline
            stats = inst.generation_stats
    assert timeline is not None
    for i, deltas in enumerate(results):
        assert tokens(deltas) == hf_greedy(d, ps[i], lengths[i]), f"request {i} (prompt of {len(ps[i])})"
    batches = [s for s in timeline.spans if s.kind == "prefill"]
    assert [s.name for s in batches] == [f"6 rows, {sum(map(len, ps))} tokens"], batches
    # Pipelined: the whole first decoder layer computed while later layers were on the wire,
    # and the batch's forward ended right behind the last bytes, not a prefill later.
    last_byte = max(s.end for s in timeline.spans if s.kind == "fetch")
    layer0 = [s for s in timeline.spans if s.kind == "compute" and (".0." in s.name)]
    assert layer0, sorted({s.name for s in timeline.spans if s.kind == "compute"})
    assert max(s.end for s in layer0) < last_byte - 0.1, (max(s.end for s in layer0), last_byte)
    assert batches[0].start < min(s.start for s in layer0)
    assert batches[0].end < last_byte + 0.5, (batches[0].end, last_byte)
    assert stats.running == 0 and stats.kv_cache_bytes_used == 0


async def test_late_arrivals_and_a_single_prompt(lm_dirs, served_root, aiohttp_origin, fault_proxy_factory, tmp_path):
    """A sequence that arrives after the cold batch closed prefills in the next one (or warm);
    a batch of one row is the warm prefill exactly. Tokens equal transformers' either way."""
    d = lm_dirs["tiny-llama-untied"]
    codec = IdCodec(d)
    first, late = prompts(2, seed=3, lengths=[9, 21])
    uri = await slow_copy(d, served_root, aiohttp_origin, fault_proxy_factory)
    async with asyncio.timeout(60):
        async with engine(tmp_path / "plans") as eng:
            inst = eng.instance("m", uri)
            a = asyncio.create_task(one(inst, codec, first, 10))
            while not any(s.kind == "compute" for s in (inst._job.result().timeline.spans  # noqa: SLF001
                                                        if inst._job is not None and inst._job.done() else [])):
                await asyncio.sleep(0.005)  # the batch has closed: its first layer computes
            b = asyncio.create_task(one(inst, codec, late, 10))
            ra, rb = await asyncio.gather(a, b)
            timeline = inst.last_timeline
    assert tokens(ra) == hf_greedy(d, first, 10)
    assert tokens(rb) == hf_greedy(d, late, 10)
    assert timeline is not None
    names = [s.name for s in sorted(timeline.spans, key=lambda s: s.start) if s.kind == "prefill"]
    assert names[0] == f"1 rows, {len(first)} tokens" and len(names) <= 2, names


async def test_unload_during_the_cold_prefill_fails_its_riders(lm_dirs, served_root, aiohttp_origin,
                                                               fault_proxy_factory, tmp_path):
    d = lm_dirs["tiny-gpt2"]
    codec = IdCodec(d)
    uri = await slow_copy(d, served_root, aiohttp_origin, fault_proxy_factory)
    async with asyncio.timeout(30):
        async with engine(tmp_path / "plans") as eng:
            inst = eng.instance("m", uri)
            riders = [asyncio.create_task(one(inst, codec, p, 8)) for p in prompts(3, seed=4, lengths=[4, 9])]
            while inst._job is None or not inst._job.done():  # noqa: SLF001 - the gates are in
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            await inst.unload()
            outcomes = await asyncio.gather(*riders, return_exceptions=True)
            assert all(isinstance(o, LoadError) for o in outcomes), outcomes
            assert inst.generation_stats.running == inst.generation_stats.waiting == 0
            # The next request loads it again and answers.
            again = await one(inst, codec, (5, 6, 7), 4)
    assert tokens(again) == hf_greedy(d, (5, 6, 7), 4)


def test_forwards_of_groups_rows_within_the_token_budget():
    """Longest first, rows x the group's longest prompt <= the budget; a longer prompt alone."""
    assert forwards_of([3, 17, 8, 25, 5, 12], 30) == [[3], [1], [5, 2], [4, 0]]
    assert forwards_of([512] * 8, 512) == [[i] for i in range(8)]
    assert forwards_of([32] * 8, 512) == [list(range(8))]
    assert forwards_of([600, 4], 512) == [[0], [1]]
    assert forwards_of([], 512) == []


async def test_a_cold_burst_in_several_forwards_equals_transformers(lm_dirs, served_root, aiohttp_origin,
                                                                   fault_proxy_factory, tmp_path, monkeypatch):
    """A burst whose padded tokens exceed ``PREFILL_CHUNK_TOKENS`` rides one cold batch computed
    as several forwards (here four of at most 30 tokens, the first through the gates): every
    row's tokens still equal transformers' greedy ones."""
    monkeypatch.setattr(coldprefill, "PREFILL_CHUNK_TOKENS", 30)
    d = lm_dirs["tiny-llama"]
    codec = IdCodec(d)
    ps = prompts(6, seed=11, lengths=[3, 17, 8, 25, 5, 12])
    lengths = [12, 5, 16, 9, 14, 7]
    uri = await slow_copy(d, served_root, aiohttp_origin, fault_proxy_factory)
    forwards: list[int] = []
    real = coldprefill._prefill_rows

    def counted(forward: Any, model: Any, rows: Any, device: Any) -> Any:
        forwards.append(len(rows))
        return real(forward, model, rows, device)

    monkeypatch.setattr(coldprefill, "_prefill_rows", counted)
    async with asyncio.timeout(60):
        async with engine(tmp_path / "plans") as eng:
            inst = eng.instance("m", uri, ModelOptions(max_sequences=8))
            await inst.load()
            await inst.unload()
            results = await asyncio.gather(*(one(inst, codec, p, n) for p, n in zip(ps, lengths)))
            timeline = inst.last_timeline
    assert timeline is not None
    assert [s.name for s in timeline.spans if s.kind == "prefill"] == [f"6 rows, {sum(map(len, ps))} tokens"]
    assert forwards == [1, 1, 2, 2], forwards
    for i, deltas in enumerate(results):
        assert tokens(deltas) == hf_greedy(d, ps[i], lengths[i]), f"request {i} (prompt of {len(ps[i])})"
