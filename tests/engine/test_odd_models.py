"""Models that are odd in ways real ones are: each loads exactly, or fails clearly, in bounded time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cicada_async.engine import plan as plan_mod
from cicada_async.engine.skeleton import skeleton_mode
from tests.fixtures.helpers import assert_equal_outputs, cicada_infer, inputs_for, reference
from tests.fixtures.odd_models import DeviceReader, LoopsOnValue, SharedLinear, write_model

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("cls", [SharedLinear, DeviceReader, LoopsOnValue])
async def test_odd_model_loads_exactly(tmp_path: Path, cls: type[nn.Module]) -> None:
    d = write_model(cls, tmp_path / cls.__name__)
    inputs = inputs_for(d)
    ref = reference(d, inputs)
    out = await cicada_infer(d, inputs)
    assert_equal_outputs(ref, out)


async def test_value_loop_dry_run_gives_up_within_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that loops on a tensor's value ends the dry run by its answer budget."""
    d = write_model(LoopsOnValue, tmp_path / "loops")
    monkeypatch.setattr(plan_mod, "DRY_RUN_MAX_ANSWERS", 200)
    t0 = time.monotonic()
    out = await cicada_infer(d, inputs_for(d))
    assert time.monotonic() - t0 < 30
    assert_equal_outputs(reference(d, inputs_for(d)), out)


def test_skeleton_mode_does_not_reach_other_threads() -> None:
    """While one thread builds a skeleton, a model built on another gets real, initialized weights."""
    inside, release = threading.Event(), threading.Event()
    built: dict[str, nn.Module] = {}

    def build_skeleton() -> None:
        with skeleton_mode():
            built["skeleton"] = nn.Linear(4, 4)
            inside.set()
            release.wait(10)

    t = threading.Thread(target=build_skeleton)
    t.start()
    try:
        assert inside.wait(10)
        other = nn.Linear(4, 4)  # this thread, while the other is inside skeleton_mode
        assert not other.weight.is_meta
        assert other.weight.abs().sum() > 0  # init ran (kaiming_uniform_ was not skipped)
    finally:
        release.set()
        t.join(10)
    assert built["skeleton"].weight.is_meta
    assert not nn.Linear(4, 4).weight.is_meta  # and nothing is left patched afterwards


def test_dry_run_answers_do_not_reach_other_threads() -> None:
    """Meta answers for data-dependent checks hold only on the dry run's thread."""
    model = nn.Linear(4, 4)
    inside, release = threading.Event(), threading.Event()
    seen: list[object] = []

    class Spec:
        def dummy_inputs(self, device: str) -> dict[str, torch.Tensor]:
            return {"input": torch.zeros(1, 4, device=device)}

    def pre(_m: nn.Module, _args: tuple[object, ...], kwargs: dict[str, torch.Tensor]) -> None:
        seen.append(bool(kwargs["input"].sum() > 0))  # a meta answer, on the dry run's thread
        inside.set()
        release.wait(10)

    with skeleton_mode():
        skeleton = nn.Linear(4, 4)
    skeleton.register_forward_pre_hook(pre, with_kwargs=True)
    t = threading.Thread(target=plan_mod.execution_order, args=(skeleton, Spec(), [""]))
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(RuntimeError, match="meta"):
            bool(torch.zeros(1, device="meta"))  # other threads: torch's own answer
        assert model.weight.sum().item() != 0
    finally:
        release.set()
        t.join(10)
    assert seen == [False]
