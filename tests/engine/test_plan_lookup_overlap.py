"""A remote model's stored-plan look-up does not hold back its first weight read (review-3 C-15).

The look-up asks the model's storage (stat + GET: one or two round trips on S3/HTTP) before the
engine's local plan_dir. The fetch used to wait for that answer before its first weight read;
now a remote load starts in file order and the plan's order is applied when the plan is made
(``replan``), as before. The origin here holds the plan file's stat until a weight read has
reached it: the order of events at the storage is the oracle, not the engine's own timeline.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from backends.memory import MemoryBackend
from cicada_async.engine.executor import Executor
from cicada_async.engine.fetch import FetchScheduler
from cicada_async.engine.job import LoadOptions
from cicada_async.engine.pipeline import LoadRequest, cold_start
from cicada_async.engine.plancache import PLAN_DIR, PlanCache
from cicada_async.engine.runtime import Engine
from cicada_async.engine.timeline import Timeline
from protocols.storage import ObjectInfo
from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference


@pytest.fixture(autouse=True)
def own_plan_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's own plan dir: the session's is shared, and a plan another test's remote
    tiny-gpt2 stored there made this fixture find no plan to write (CI at ea99280)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

pytestmark = pytest.mark.timeout(120)

HOLD_S = 10.0  # an upper bound on how long the origin holds the plan's stat, not a timing


class PlanAfterWeights(MemoryBackend):
    """Answers a plan file's stat only once a weight read has arrived (or after HOLD_S)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__(objects)
        self.asked_for_plan = False
        self.weights_asked = asyncio.Event()
        self.weights_before_plan_answer: bool | None = None

    async def stat(self, key: str) -> ObjectInfo:
        if key.startswith(f"{PLAN_DIR}/"):
            self.asked_for_plan = True
            try:
                await asyncio.wait_for(self.weights_asked.wait(), HOLD_S)
            except TimeoutError:
                pass
            if self.weights_before_plan_answer is None:
                self.weights_before_plan_answer = self.weights_asked.is_set()
        return await super().stat(key)

    async def read_into(self, key: str, offset: int, buf: memoryview, *, version: str | None = None) -> None:
        # Headers are read before the look-up starts: a safetensors read after it is a weight read.
        if self.asked_for_plan and key.endswith(".safetensors"):
            self.weights_asked.set()
        await super().read_into(key, offset, buf, version=version)


async def test_remote_plan_lookup_runs_alongside_the_first_weight_reads(model_dirs: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    d = tmp_path / "tiny-gpt2"
    shutil.copytree(model_dirs["tiny-gpt2"], d, ignore=shutil.ignore_patterns(PLAN_DIR))
    inputs = inputs_for(d)
    async with Engine() as engine:  # writes the plan file beside the local model
        await engine.instance("m", str(d)).infer(inputs)
    assert list((d / PLAN_DIR).glob("plan-*.json")), "fixture: no plan file was stored"

    root = d
    backend = PlanAfterWeights({p.relative_to(root).as_posix(): p.read_bytes()
                                for p in root.rglob("*") if p.is_file()})
    plans = PlanCache(tmp_path / "plans").for_load("m", backend, None)
    assert plans is not None
    ex = Executor()
    ex.start()
    timeline = Timeline()
    try:
        _, outputs, job = await cold_start(backend, ex, FetchScheduler(2), LoadRequest(
            inputs=inputs, plan_lookup=plans.lookup, options=LoadOptions(read_bytes=16 << 10)),
            timeline=timeline)
    finally:
        await backend.aclose()
        ex.stop()
    assert backend.weights_before_plan_answer is True, \
        "the first weight read waited for the remote plan look-up"
    # The stored order still applies: found, used, and no dry forward.
    assert plans.found is not None and job.plan.modules == plans.found.modules
    assert "dry-run" not in {s.name for s in timeline.spans if s.kind == "stage"}
    assert isinstance(outputs, dict)
    assert_equal_outputs(reference(d, inputs), outputs)
