"""A fresh process's imports of torch and transformers run without the cyclic collector.

``importgc`` pauses the collector around the served path's heavy imports (a Ray replica's
start, the engine's warm import, a model class's first use) and freezes what the first two made. The
oracle is the interpreter itself: ``gc.callbacks`` sees every collection. Before ``importgc``
the same imports in a fresh process ran ~870 collections (0.55-0.63 s of ~3 s on this
machine); a change that brings the collector back into those imports fails here. The outputs
are compared with plain PyTorch / transformers loads of the same weights in that process,
bit for bit: nothing about the models may change with the way they were imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SERVED = r"""
import asyncio, gc, json, sys, time
from pathlib import Path
counts = {"during": 0, "all": 0}
phase = ["before"]
def cb(p, info):
    if p == "start":
        counts["all"] += 1
        if phase[0] == "imports":
            counts["during"] += 1
gc.callbacks.append(cb)
from cicada_async.service.ray_replica import _import_engine  # what a Ray replica's start runs
phase[0] = "imports"
_import_engine(1)
from cicada_async.engine import hfimport
hfimport.warm()  # what the engine's executor runs at start
phase[0] = "after"  # a model class's first use pauses the collector but freezes nothing: a
# collection may follow it (see test_an_import_inside_a_load_leaves_nothing_of_it_after_the_unload)
dirs = json.loads(sys.argv[1])
for d in dirs.values():
    if Path(d, "config.json").exists():  # a transformers model (tiny-mlp is a plain factory)
        arch = json.loads(Path(d, "config.json").read_text())["architectures"][0]
        assert hfimport.find(arch) is not None, arch
assert gc.isenabled()
frozen = gc.get_freeze_count()

import torch
from tests.fixtures.helpers import cicada_infer, inputs_for, reference
equal = {}
for name, d in dirs.items():
    inputs = inputs_for(Path(d))
    out = asyncio.run(cicada_infer(Path(d), inputs))
    ref = reference(Path(d), inputs)
    equal[name] = sorted(out) == sorted(ref) and all(
        out[k].dtype == ref[k].dtype and torch.equal(out[k], ref[k]) for k in ref)
print(json.dumps({"during": counts["during"], "frozen": frozen, "equal": equal,
                  "enabled": gc.isenabled(), "modules": len(sys.modules)}))
"""


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert isinstance(out, dict)
    return out


def test_served_imports_run_no_collection_and_models_stay_exact(model_dirs: dict[str, Path]) -> None:
    names = ["tiny-gpt2", "tiny-bert", "tiny-llama", "tiny-vit", "tiny-resnet", "tiny-mlp"]
    dirs = {n: str(model_dirs[n]) for n in names}
    out = _python(_SERVED, json.dumps(dirs))
    assert out["during"] == 0, f"{out['during']} collections during the imports"
    assert isinstance(out["frozen"], int) and out["frozen"] > 100_000  # torch's and transformers' objects
    assert out["enabled"] is True
    assert out["equal"] == {n: True for n in names}


_SCOPES = r"""
import gc, json, sys, threading
from cicada_async.engine import importgc
out = {}
with importgc.paused():
    with importgc.paused():
        out["inner_off"] = not gc.isenabled()
    out["outer_still_off"] = not gc.isenabled()
    import colorsys  # a module imported in the scope: the outermost end freezes
out["on_after"] = gc.isenabled()
out["frozen_after_import"] = gc.get_freeze_count() > 0
gc.unfreeze()
with importgc.paused():
    pass
out["no_import_no_freeze"] = gc.get_freeze_count() == 0
# A scope opened in one thread and closed after another thread's: the collector comes back
# only when the last one closes.
entered, release = threading.Event(), threading.Event()
def other():
    with importgc.paused():
        entered.set()
        release.wait(10)
t = threading.Thread(target=other); t.start(); entered.wait(10)
with importgc.paused():
    pass
out["off_while_other_thread_in_scope"] = not gc.isenabled()
release.set(); t.join()
out["on_after_both"] = gc.isenabled()
gc.disable()
with importgc.paused():
    import wave
out["app_disabled_stays_disabled"] = not gc.isenabled()
out["app_disabled_no_freeze"] = gc.get_freeze_count() == 0
gc.enable()
print(json.dumps(out))
"""


def test_scopes_nest_across_threads_and_respect_a_disabled_collector() -> None:
    out = _python(_SCOPES)
    assert out == {k: True for k in out} and len(out) == 9, out


def test_the_environment_can_leave_the_collector_alone() -> None:
    code = ("import gc, json; from cicada_async.engine import importgc\n"
            "with importgc.paused():\n    on = gc.isenabled()\n    import colorsys\n"
            "print(json.dumps({'on_inside': on, 'frozen': gc.get_freeze_count()}))")
    assert _python(code, env={"CICADA_IMPORT_GC": "on"}) == {"on_inside": True, "frozen": 0}


_UNLOADED = r"""
import asyncio, gc, json, sys
from pathlib import Path
from cicada_async.engine.runtime import Engine, ModelOptions
from tests.fixtures.helpers import inputs_for
d = Path(sys.argv[1]).resolve()
def mapped():
    return sorted({line.split()[-1] for line in open("/proc/self/maps") if str(d) in line})
async def main():
    # No warm import: transformers is first imported inside the load's skeleton build.
    async with Engine(warm_imports=False) as engine:
        inst = engine.instance("m", str(d), ModelOptions())
        await inst.infer(inputs_for(d))
        loaded = mapped()
        await inst.unload()
    return loaded
loaded = asyncio.run(main())
gc.collect()
print(json.dumps({"imported_in_load": "transformers" in sys.modules, "loaded": loaded, "after": mapped()}))
"""


def test_an_import_inside_a_load_leaves_nothing_of_it_after_the_unload(model_dirs: dict[str, Path]) -> None:
    """A model's files are unmapped after its unload and a collection, also when transformers
    was first imported inside that model's load (a freeze there kept them mapped for good)."""
    out = _python(_UNLOADED, str(model_dirs["tiny-gpt2"]))
    assert out["imported_in_load"] is True
    assert out["loaded"], "the load did not map the weights: the test no longer sees its case"
    assert out["after"] == [], out
