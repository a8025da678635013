"""The resident path (engine/resident.py): files in the page cache load without the pipeline.

Which path a load must take is known from outside the engine: the bench's own ``mincore``
(bench/pagecache.py) says whether the files are resident, and ``posix_fadvise(DONTNEED)``
evicts them as the cold-start benchmark does. The answer must be transformers'
``from_pretrained`` forward's, bit for bit, on either path.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch
import transformers

from cicada_async.bench.pagecache import make_cold, make_warm, residency, weight_files
from cicada_async.engine.forward import output_dict
from cicada_async.engine.runtime import Engine, ModelOptions
from cicada_async.engine.timeline import Timeline
from cicada_async.models.catalogue import make_model
from tests.fixtures.helpers import assert_equal_outputs, inputs_for


def _from_pretrained(d: Path, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model = transformers.GPT2LMHeadModel.from_pretrained(str(d)).eval()
    with torch.inference_mode():
        return output_dict(model(**inputs))


async def _served(d: Path, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Timeline]:
    async with Engine(warm_imports=False) as engine:
        inst = engine.instance("m", str(d), ModelOptions(), describe=False)
        out = await inst.infer(inputs)
        assert inst.last_timeline is not None
        return out, inst.last_timeline


def _evicted(d: Path) -> float:
    """Evict the weights (the last engine's mappings go on a thread of their own: retry)."""
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        left = make_cold(d)
        if left.resident_bytes == 0 or time.monotonic() > deadline:
            return left.fraction
        time.sleep(0.1)


def _half_evicted(f: Path) -> float:
    """The file's second half dropped from the page cache; the fraction still resident."""
    size = f.stat().st_size
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, size // 2, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        frac = residency([f]).fraction
        if frac < 0.7 or time.monotonic() > deadline:
            return frac
        time.sleep(0.1)


async def test_resident_and_evicted_loads_both_answer_as_from_pretrained(tmp_path: Path) -> None:
    d = make_model("tiny-gpt2", tmp_path / "m", seed=3)
    inputs = inputs_for(d)
    ref = _from_pretrained(d, inputs)
    gc.collect()

    assert make_warm(d).fraction == 1.0  # the oracle: every weight page is in the page cache
    out, tl = await _served(d, inputs)
    assert_equal_outputs(ref, out)
    stages = tl.summary()["stages"]
    assert "resident" in stages, stages
    assert not [s for s in tl.spans if s.kind == "fetch"], "a resident load fetched"
    assert [s.nbytes for s in tl.spans if s.name == "residency"] == [sum(f.stat().st_size for f in weight_files(d))]

    assert _evicted(d) == 0.0, "fixture: the weights could not be evicted"
    assert residency(weight_files(d)).trusted
    out, tl = await _served(d, inputs)
    assert_equal_outputs(ref, out)
    stages = tl.summary()["stages"]
    assert "resident" not in stages, stages
    assert tl.summary()["bytes"] > 0, "the evicted load read nothing"
    # Only what reading the header brought in (with the kernel's readahead) was resident.
    [seen] = [s.nbytes for s in tl.spans if s.name == "residency"]
    assert seen < sum(f.stat().st_size for f in weight_files(d)) // 2

    # Half resident is not enough: the rest would be read by page faults inside the forward.
    make_warm(d)
    frac = _half_evicted(weight_files(d)[0])
    assert 0.3 < frac < 0.7, f"fixture: {frac:.2f} of the weights resident"
    out, tl = await _served(d, inputs)
    assert "resident" not in tl.summary()["stages"]
    assert_equal_outputs(ref, out)

    make_warm(d)
    out, tl = await _served(d, inputs)
    assert "resident" in tl.summary()["stages"]
    assert_equal_outputs(ref, out)
