"""What a cold start costs in GB-seconds, in /metrics and the cold start log line (real engine)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from cicada_async.engine.rss import GIB, cost_of
from cicada_async.service.metrics import parse_text
from tests.fixtures.server import live_server, real_config
from tests.fixtures.triton import TRITON_WARNINGS, get_text

pytestmark = TRITON_WARNINGS
httpclient = pytest.importorskip("tritonclient.http")


def _hwm() -> int:
    """VmHWM: the kernel's peak RSS (getrusage's maxrss lags it by the last few pages)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_cost_of_samples() -> None:
    c = cost_of([(0.0, GIB), (1.0, 3 * GIB), (2.0, GIB)])
    assert c.seconds == 2.0 and c.rss_peak_bytes == 3 * GIB and c.samples == 3
    assert c.gb_seconds == pytest.approx(6.0)  # peak x duration
    assert c.gb_seconds_held == pytest.approx(4.0)  # the trapezoids: 2 + 2


def test_metrics_report_gb_seconds_of_a_cold_start(model_dirs, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cicada.repository")
    with live_server(real_config(model_dirs, ("tiny-gpt2",))) as server:
        c = httpclient.InferenceServerClient(server.url)
        try:
            ids = httpclient.InferInput("input_ids", [1, 8], "INT64")
            ids.set_data_from_numpy(np.arange(8, dtype=np.int64).reshape(1, 8))
            # The kernel's own peak, from here on (proc(5): clear_refs "5" resets VmHWM to the
            # current RSS): the oracle for the engine's sampled peak, independent of engine/rss.py.
            Path("/proc/self/clear_refs").write_text("5")
            t0 = time.monotonic()
            c.infer("tiny-gpt2", [ids])
            wall = time.monotonic() - t0
            hwm = _hwm()
        finally:
            c.close()
        text = server.call(lambda: get_text(server, "/metrics"))
    assert "# TYPE cicada_cold_start_gb_seconds histogram" in text
    m = parse_text(text)
    label = '{model="tiny-gpt2"}'
    assert m[f"cicada_cold_start_gb_seconds_count{label}"] == 1
    gbs = m[f"cicada_cold_start_gb_seconds_sum{label}"]
    peak = m[f"cicada_cold_start_peak_rss_bytes{label}"]
    seconds = m[f"cicada_cold_start_seconds_sum{label}"]
    # The server ran in this process: a sampled peak never exceeds the kernel's peak over the
    # request (VmHWM is updated lazily from per-CPU counters: a few pages of slack), and misses
    # at most what rose and fell between two samples of a tiny model's load.
    assert hwm - (16 << 20) <= peak <= hwm + (4 << 20), (peak >> 20, hwm >> 20)
    # The load ran inside the request; GB-seconds are its peak times its duration, so bounded
    # by the kernel's peak times the request's wall time.
    assert 0 < seconds <= wall
    assert (hwm - (16 << 20)) / GIB * seconds <= gbs <= (hwm + (4 << 20)) / GIB * wall

    line = next(r.__dict__ for r in caplog.records if getattr(r, "event", None) == "cold_start")
    memory = line["timeline"]["memory"]
    assert memory["rss_peak_bytes"] == peak and memory["gb_seconds"] == pytest.approx(gbs)
    assert memory["samples"] >= 2 and memory["gb_seconds_held"] <= memory["gb_seconds"] + 1e-9
