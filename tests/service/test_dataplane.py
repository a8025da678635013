"""The data plane on its own (no transport), and the seams around it: gRPC without aiohttp, the
test doubles against the serving protocols, one priority scale from the wire's number on."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cicada_async.service.dataplane import DataPlane
from cicada_async.service.state import ServingState
from protocols import v2
from protocols.errors import ModelNotFound, ShuttingDown
from protocols.serving import Priority, ServedModel, ServingEngine
from tests.fixtures.server import FakeEngine, FakeInstance, fake_config, with_model

ROOT = Path(__file__).resolve().parents[2]


def test_grpc_front_end_imports_nothing_of_aiohttp() -> None:
    """gRPC holds the data plane, not an aiohttp application: HTTP stays HTTP's."""
    code = "import sys; import cicada_async.service.grpc_server; assert 'aiohttp' not in sys.modules, 'aiohttp'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


FRONT_ENDS = {"routes", "infer", "http_auth", "lifecycle", "connections", "responses", "server", "grpc_server",
              "openai_api", "openai_wire", "generate_api", "sse", "ray_serve", "ray_ingress", "ray_generate",
              "ray_wire"}


def _service_imports(module: str) -> set[str]:
    """What a service module imports: its service siblings by short name, other packages in full."""
    tree = ast.parse((ROOT / "cicada_async" / "service" / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            found.add(n.removeprefix("cicada_async.service.") if n.startswith("cicada_async.service.") else n)
    return found


def test_the_core_imports_no_front_end() -> None:
    """Imports run front ends -> data plane -> engine: nothing the data plane reaches imports a
    transport (aiohttp, grpc) or a front-end module."""
    missing = sorted(m for m in FRONT_ENDS if not (ROOT / "cicada_async" / "service" / f"{m}.py").exists())
    assert not missing, f"FRONT_ENDS names no module: {missing}"
    seen: set[str] = set()
    todo = ["dataplane"]
    while todo:
        module = todo.pop()
        seen.add(module)
        imports = _service_imports(module)
        bad = sorted(n for n in imports if n in FRONT_ENDS or n.split(".")[0] in ("aiohttp", "grpc"))
        assert not bad, f"{module} imports {bad}"
        todo += [n for n in imports if (ROOT / "cicada_async" / "service" / f"{n}.py").exists() and n not in seen]
    assert {"repository", "scheduler", "state", "auth", "checks"} <= seen


def _members(protocol: type) -> set[str]:
    return {n for n in vars(protocol) if not n.startswith("_")}


@pytest.mark.parametrize(("protocol", "double"), [(ServingEngine, FakeEngine), (ServedModel, FakeInstance)])
def test_doubles_implement_every_member_of_the_seam(protocol: type, double: type) -> None:
    engine = FakeEngine()
    obj = engine if double is FakeEngine else engine.instance("m", "mem://m")
    missing = sorted(n for n in _members(protocol) if not hasattr(obj, n))
    assert not missing, f"{double.__name__} lacks {missing} of {protocol.__name__}"


def test_the_serving_state_is_typed() -> None:
    state = ServingState()
    assert (state.draining, state.restarting, state.aborting, state.executor_restarts, state.inflight) == (
        False, False, False, 0, set())
    assert [f.name for f in dataclasses.fields(state)] == [
        "draining", "restarting", "aborting", "executor_restarts", "inflight"]


def _req(priority: int | None = None) -> v2.InferRequest:
    params = {} if priority is None else {"priority": priority}
    return v2.InferRequest({"x": torch.ones(1, 4)}, parameters=params)


async def test_the_wire_priority_becomes_one_priority_at_the_edge() -> None:
    engine = FakeEngine(load_s=0.0)
    config = with_model(fake_config(("alpha",)), "alpha", default_priority=7)
    async with DataPlane(config, lambda c: engine) as dp:
        entry = dp.admit("alpha")
        for wire in (None, 0, 3, 1):
            with dp.accounted("alpha") as outcome:
                out = await dp.infer(entry, _req(wire), outcome)
            assert set(out) == {"y", "argmax"}
        # Each request runs at its own level; 0 and absent mean the model's default.
        inst = engine.instances["alpha"]
        assert [p for _, p, _ in inst.calls] == [7, 7, 3, 1]
        assert dp.statistics("alpha")[0]["inference_count"] == 4
        assert engine.prebuilt == ["alpha"]


async def test_metadata_readiness_and_drain_without_a_transport() -> None:
    engine = FakeEngine(load_s=0.0)
    async with DataPlane(fake_config(("alpha",)), lambda c: engine) as dp:
        assert dp.live() and dp.readiness().ready
        assert dp.server_metadata().name == "cicada-async"
        assert dp.model_names() == ["alpha"]
        assert dp.model_metadata("alpha", "1")["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        with pytest.raises(ModelNotFound):
            dp.model_config("alpha", "2")
        await dp.load("alpha")
        assert [m["state"] for m in await dp.repository_index()] == ["READY"]
        assert dp.model_readiness("alpha").ready
        assert dp.authorize("admin", None) is None  # no tokens configured: every route is open
        engine.healthy = False
        assert not dp.readiness().ready and "executor" in dp.readiness().reason
        engine.healthy = True
        dp.begin_drain()
        assert dp.state.draining and dp.readiness().reason == "server is shutting down"
        assert not dp.model_readiness("alpha").ready
        with pytest.raises(ShuttingDown):
            dp.admit("alpha")
    assert Priority.from_wire(0, Priority(7)) == Priority(7)
