"""The ``cicada`` command end to end, as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
from pathlib import Path
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from cicada_async.bench.pagecache import make_cold
from tests.fixtures.helpers import inputs_for, reference


def cicada(*args: str) -> subprocess.CompletedProcess[str]:
    # MKL's strict reproducibility in every child, so their outputs compare bit for bit.
    env = dict(os.environ, MKL_CBWR="AUTO,STRICT")
    return subprocess.run([sys.executable, "-m", "cicada_async", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_run_all_strategies_agree(model_dirs, tmp_path):
    """Each strategy, in its own process, gives exactly the plain load's (eager's) outputs."""
    d = model_dirs["tiny-gpt2"]
    inputs = inputs_for(d)
    save_file(inputs, str(tmp_path / "in.safetensors"))
    outs = {}
    for strategy in ("eager", "cicada", "meta-mmap", "hf"):
        out_path = tmp_path / f"{strategy}.safetensors"
        r = cicada("run", str(d), "--input", str(tmp_path / "in.safetensors"), "--output", str(out_path),
                   "--strategy", strategy)
        assert r.returncode == 0, r.stderr
        assert f"{strategy}: cold inference" in r.stdout
        outs[strategy] = load_file(str(out_path))["logits"]
    # The same weights as this process's reference (bit-exactness across processes needs the
    # same MKL mode in both, so across the boundary only closeness is checked).
    assert torch.allclose(outs["eager"], reference(d, inputs)["logits"], rtol=1e-4, atol=1e-5)
    for strategy, logits in outs.items():
        assert torch.equal(logits, outs["eager"]), strategy


def test_run_writes_timeline_and_plot(model_dirs, tmp_path):
    # Evicted first: with its files in the page cache the load would take the resident path,
    # which reads nothing (engine/resident.py); this run checks the pipeline's timeline.
    make_cold(model_dirs["tiny-bert"])
    r = cicada("run", str(model_dirs["tiny-bert"]), "--timeline", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png"))
    assert r.returncode == 0, r.stderr
    tl = json.loads((tmp_path / "t.json").read_text())
    kinds = {s["kind"] for s in tl["spans"]}
    assert {"fetch", "apply", "compute", "stage"} <= kinds
    s = tl["summary"]
    files = list(model_dirs["tiny-bert"].glob("*.safetensors"))
    tensor_bytes = sum(_tensor_bytes(f) for f in files)
    # Every tensor byte was fetched; at most the files plus one alignment page each.
    assert tensor_bytes <= s["bytes"] <= sum(f.stat().st_size + 4096 for f in files), (s["bytes"], tensor_bytes)
    assert 0 < s["time_to_first_compute_s"] < s["total_s"]
    # The overlap the command printed is the one its timeline file holds.
    assert f"overlap {s['utilization']:.2f}," in r.stdout, (r.stdout, s["utilization"])
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_lists_shards_in_execution_order(model_dirs):
    r = cicada("plan", str(model_dirs["tiny-gpt2"]))
    assert r.returncode == 0, r.stderr
    assert "order from dry-forward" in r.stdout
    modules = [line.split()[2] for line in r.stdout.splitlines() if line.strip().startswith("shard")]
    assert modules[0] == "transformer.wte"
    assert modules.index("transformer.h.0.ln_1") < modules.index("transformer.h.1.ln_1") < modules.index("transformer.ln_f")


def test_errors_are_one_line_and_nonzero(tmp_path):
    r = cicada("run", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.startswith("cicada: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cicada("make-model", "no-such-model", str(tmp_path / "x"))
    assert r.returncode == 1 and "unknown model" in r.stderr


def test_make_model_sharded(tmp_path):
    r = cicada("make-model", "tiny-llama", str(tmp_path / "m"), "--max-shard-bytes", "100000")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    r = cicada("run", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr


def _tensor_bytes(path: Path) -> int:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
