"""The soak in CI: 30 s of mixed warm, cold-start, unload, bad and abandoned requests against a
real server process. By hand: ``python loadtest/soak.py --duration 600``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import soak


@pytest.mark.timeout(150)
def test_soak_no_failures_no_growth(model_dirs: dict[str, Path]) -> None:
    summary = soak.run(duration=30, models_root=model_dirs["tiny-gpt2"].parent)
    print(json.dumps(summary))
    assert summary["wrong_answers"] == 0
    assert summary["failures"] == 0, summary["failure_examples"]
    assert summary["rss_growth_mb"] < soak.RSS_BOUND_MB, summary["rss_mb"]
    assert summary["threads"]["final_idle"] <= summary["threads"]["after_warmup"] + soak.SLACK, summary["threads"]
    assert summary["fds"]["final_idle"] <= summary["fds"]["after_warmup"] + soak.SLACK, summary["fds"]
    assert summary["exit_code_after_sigterm"] == 0
    assert summary["requests_ok"].get("cold_cycle", 0) >= 5 and summary["requests_ok"].get("cold_keepalive", 0) >= 3
    assert summary["passed"]
