"""The process's first millisecond: weights read into the page cache before torch imports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cicada_async.bench.origins import stop_process
from cicada_async.bench.pagecache import evict_checked, resident_bytes
from cicada_async.engine.prefetch import prefetch_dirs, start_for_cli, weight_files

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_start_line(config: Path, **env: str) -> dict:
    """Spawn ``cicada serve --config``; its "start" log line (then SIGTERM)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cicada_async", "serve", "--config", str(config)],
        env=dict(os.environ, PORT=str(_free_port()), PYTHONPATH=str(ROOT), **env),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "start":
                return doc
        raise AssertionError(f"no start line (exit {proc.poll()})")
    finally:
        stop_process(proc, timeout=30)


def test_serve_starts_prefetch_before_torch_is_imported(model_dirs, tmp_path):
    d = model_dirs["tiny-gpt2"]
    cfg = tmp_path / "cicada.toml"
    cfg.write_text(f'[server]\nprefetch = true\n[models.g]\nuri = "{d}"\n[models.r]\nuri = "http://127.0.0.1:9/r"\n')
    t_spawn = time.time()
    start = _serve_start_line(cfg)
    pf = start["prefetch"]
    assert pf is not None and pf["error"] is None
    assert pf["files"] == [str(d / "model.safetensors")]
    assert pf["bytes"] == (d / "model.safetensors").stat().st_size
    # The marker: when the prefetch began, nothing had imported torch yet.
    assert pf["torch_loaded_at_start"] is False
    assert t_spawn < pf["started_at"] < start["ts"]
    assert any("remote" in s for s in pf["skipped"])

    off = _serve_start_line(cfg, CICADA_PREFETCH="0")
    assert off["prefetch"] is None
    default = tmp_path / "default.toml"  # no [server] prefetch: off
    default.write_text(f'[models.g]\nuri = "{d}"\n')
    assert _serve_start_line(default)["prefetch"] is None


def test_prefetch_fills_the_page_cache(model_dirs):
    d = model_dirs["tiny-gpt2-sharded"]
    files = weight_files(d)
    assert len(files) > 1 and all(f.suffix == ".safetensors" for f in files)
    evict_checked(d)
    assert sum(resident_bytes(f) for f in files) == 0
    pf = prefetch_dirs([d])
    assert pf.wait(60)
    assert pf.error is None and pf.done_bytes == pf.total_bytes == sum(f.stat().st_size for f in files)
    assert sum(resident_bytes(f) for f in files) == pf.total_bytes
    assert pf.summary()["seconds"] is not None


def test_budget_and_switches(model_dirs, tmp_path, monkeypatch):
    d = model_dirs["tiny-gpt2"]
    size = (d / "model.safetensors").stat().st_size
    small = prefetch_dirs([d], budget=size - 1)
    assert small.wait(10) and small.files == [] and "budget" in small.skipped[0]

    monkeypatch.delenv("CICADA_PREFETCH", raising=False)
    cfg = tmp_path / "c.toml"
    for setting in ("", "[server]\nprefetch = false\n"):  # off by default, and when said
        cfg.write_text(f'{setting}[models.g]\nuri = "{d}"\n')
        assert start_for_cli(["serve", "--config", str(cfg)]) is None
    assert start_for_cli(["run", "--strategy", "cicada", str(d)]) is None
    monkeypatch.setenv("CICADA_PREFETCH", "1")  # the environment overrides the config
    pf = start_for_cli(["serve", "--config", str(cfg)])
    assert pf is not None and pf.wait(30) and pf.files == [d / "model.safetensors"]

    pf = start_for_cli(["run", "--strategy", "cicada", str(d)])
    assert pf is not None and pf.wait(30) and pf.files == [d / "model.safetensors"]
    pf = start_for_cli(["serve", "--model-repository", str(d.parent)])
    assert pf is not None and pf.wait(60) and d / "model.safetensors" in pf.files
    assert start_for_cli(["plan", str(d)]) is None


@pytest.mark.parametrize("uri", ["s3://bucket/m", "https://host/m"])
def test_remote_models_are_skipped(tmp_path, uri):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nprefetch = true\n[models.m]\nuri = "{uri}"\n')
    pf = start_for_cli(["serve", "--config", str(cfg)])
    assert pf is not None and pf.files == [] and pf.skipped == [f"m: remote ({uri}); not prefetched"]
