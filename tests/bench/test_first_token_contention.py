"""first_token_contention on a tiny Llama: the prefill alone and beside a cold read of the same
bytes, every read from a page cache checked cold (``mincore``), the scratch copy removed."""

from __future__ import annotations

from pathlib import Path

from cicada_async.bench.first_token_contention import REPEAT, measure
from cicada_async.bench.pagecache import weight_files


def test_contention_measures_both_ways_and_cleans_up(model_dirs: dict[str, Path]) -> None:
    d = model_dirs["tiny-llama"]
    doc = measure(d, [(8, 2)])
    assert doc["bytes"] == sum(f.stat().st_size for f in weight_files(d))
    assert len(doc["reads_alone"]) == REPEAT and all(r["read_s"] > 0 for r in doc["reads_alone"])
    (shape,) = doc["shapes"]
    assert shape["prompt_tokens"] == 8 and shape["batch"] == 2
    assert len(shape["with_read"]) == REPEAT
    assert all(r["prefill_s"] > 0 and r["read_s"] > 0 for r in shape["with_read"])
    assert not list(d.parent.glob(".contention-*"))
