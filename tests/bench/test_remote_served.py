"""The remote benchmark's served strategy: a real ``cicada serve`` answers one cold V2 request
from an nginx origin, after the caller's eviction, and a model the origin lacks is an error
record, not a hang or a survivor."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest

from cicada_async.bench.origins import start_http_origin
from cicada_async.bench.remote_served import served_run

pytestmark = pytest.mark.timeout(180)
SEQ = 16


@pytest.fixture(autouse=True)
def own_plan_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The served model is remote, so its server stores its plan under $XDG_CACHE_HOME, which
    # the test session shares: a tiny-gpt2 plan left there is found by later tests' lookups
    # of the same bytes (test_plan_cache's first cold starts then ran no dry forward).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _origin(model_dirs: dict[str, Path], tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(model_dirs["tiny-gpt2"], root / "m")
    for p in [tmp_path, *root.rglob("*"), root]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    (tmp_path / "nginx").mkdir()
    return root


def test_a_served_cold_answer_after_the_eviction(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    root = _origin(model_dirs, tmp_path)
    vocab = json.loads((root / "m" / "config.json").read_text())["vocab_size"]
    evicted: list[bool] = []
    with ExitStack() as stack:
        base, _ = start_http_origin(root, tmp_path / "nginx", stack)
        r = served_run(f"{base}/m/", {}, root / "m", lambda: evicted.append(True), SEQ)
    assert "error" not in r, r
    assert evicted == [True]  # once, after the server was up: the clock starts after it
    assert r["total_s"] > 0 and r["parts"]["server_ready_s"] > 0
    # The logits came back whole: 1 x SEQ x vocab float32 in the binary part.
    assert r["parts"]["answer_bytes"] >= SEQ * vocab * 4


def test_a_model_the_origin_lacks_is_an_error_record(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    root = _origin(model_dirs, tmp_path)
    with ExitStack() as stack:
        base, _ = start_http_origin(root, tmp_path / "nginx", stack)
        r = served_run(f"{base}/nothing-here/", {}, root / "m", lambda: None, SEQ)
    assert "error" in r and "total_s" not in r, r
    assert r["error"].startswith("HTTP 5") and "config.json" in r["error"], r  # the server's own message
