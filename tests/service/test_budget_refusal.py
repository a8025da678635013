"""A cold start that the memory budget refuses, on a real process: the refusal is a shed
request (503), not a failed cold start in cicada_cold_starts_total.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cicada_async.service.metrics import parse_text
from tests.service.rawhttp import infer_body, request, serve


def _metrics(port: int) -> dict[str, float]:
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200
    return parse_text(body.decode())


@pytest.mark.timeout(60)
def test_budget_refusal_is_not_a_failed_cold_start(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    mlp = model_dirs["tiny-mlp"]  # 50 kB of weights: more than the whole budget
    cfg = f"""
[server]
memory_budget_bytes = 10_000
[models.mlp]
uri = "{mlp}"
"""
    with serve(cfg, tmp_path) as server:
        status, _, body = request(server.port, "POST", "/v2/models/mlp/infer", infer_body([1, 2, 3]))
        assert status == 503 and b"memory budget" in body, body
        metrics = _metrics(server.port)
        assert metrics.get('cicada_cold_starts_total{model="mlp",outcome="failure"}', 0) == 0, metrics
