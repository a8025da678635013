"""What a fresh process's first request no longer pays: rename rules it does not need, idle cores."""

from __future__ import annotations

import os

import pytest
import torch

from cicada_async.engine.forward import all_cores
from cicada_async.engine.headers import all_tensors
from cicada_async.engine.modeldir import read_model_spec
from cicada_async.engine.pipeline import read_headers
from cicada_async.engine.skeleton import build_skeleton, index_skeleton
from backends.local import LocalBackend
from protocols.errors import WeightMismatch


async def _parts(d):
    backend = LocalBackend(d)
    try:
        spec = await read_model_spec(backend)
        return spec, all_tensors(await read_headers(backend, spec))
    finally:
        await backend.aclose()


async def test_rename_rules_are_built_only_when_names_differ(model_dirs):
    spec, tensors = await _parts(model_dirs["tiny-gpt2"])
    model = build_skeleton(spec, None)
    calls = []

    def renamer():
        calls.append(1)
        return lambda n: n.replace("legacy.", "")

    index_skeleton(model, tensors, renamer=renamer)
    assert calls == []  # saved by the same class: no rules compiled
    legacy = {f"legacy.{k}": v for k, v in tensors.items()}
    index = index_skeleton(model, legacy, renamer=renamer)
    assert calls == [1] and set(index.slots) == set(legacy)
    with pytest.raises(WeightMismatch):
        index_skeleton(model, legacy, renamer=lambda: None)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_all_cores_for_the_block_then_back():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with all_cores():
            assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == 1
        with all_cores(False):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
