"""The cold-start metrics a real engine exports agree with its timeline and with the checkpoint.

The storage is the memory backend with a delay on every read (``[storage.memory] delay_s``, a
slow origin as a user configures it), so the gated forward really waits for weights: the stall
and throughput gauges are asserted on a cold start where they are not trivially 0, and the
utilization where its value is known (one read, no compute during it: 0).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from cicada_async.service.metrics import parse_text
from tests.fixtures.server import live_server, real_config, with_model
from tests.fixtures.triton import get_text

httpclient = pytest.importorskip("tritonclient.http")

DELAY_S = 0.15
LAB = '{model="tiny-gpt2"}'


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file, from its header alone."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(b - a for k, v in header.items() if k != "__metadata__" for a, b in [v["data_offsets"]])


def test_cold_start_metrics_are_the_real_timeline(tmp_path: Path) -> None:
    from cicada_async.models.catalogue import make_model

    model = make_model("tiny-gpt2", tmp_path / "tiny-gpt2")
    config = with_model(real_config({"tiny-gpt2": model}, ("tiny-gpt2",)), "tiny-gpt2", uri=f"memory://{model}")
    config.storage = {"memory": {"delay_s": DELAY_S}}
    x = np.random.default_rng(0).integers(0, 200, (1, 8), dtype=np.int64)
    with live_server(config) as server:
        c = httpclient.InferenceServerClient(server.url)
        inp = httpclient.InferInput("input_ids", list(x.shape), "INT64")
        inp.set_data_from_numpy(x)
        runs = []
        for _ in range(2):  # two cold starts: gauges follow the last one, counters add up
            c.infer("tiny-gpt2", [inp])
            tl = server.repo.get("tiny-gpt2").instance.last_timeline
            s = tl.summary()
            m = parse_text(server.call(lambda: get_text(server, "/metrics")))
            runs.append((s, m, max(sp.end for sp in tl.spans if sp.kind == "fetch")))
            c.unload_model("tiny-gpt2")
        c.close()

    want_bytes = tensor_bytes(model / "model.safetensors")
    for i, (s, m, fetch_end) in enumerate(runs, 1):
        # The timeline itself is physical: every tensor byte read once, each read delayed.
        assert s["bytes"] == want_bytes
        assert s["stages"]["fetch_s"] >= DELAY_S
        assert s["stall_s"] > 0, "reads are delayed: the gated forward must have waited"
        # The file (under 1 MB) is smaller than one read, so every layer waits for that read:
        # nothing computes until the fetch has ended, and the overlap must be 0.
        assert s["time_to_first_compute_s"] >= fetch_end, (s["time_to_first_compute_s"], fetch_end)
        assert s["utilization"] == 0.0, repr(s)
        assert 0 < s["time_to_first_compute_s"] < s["total_s"]
        assert s["gbps"] == pytest.approx(want_bytes / s["stages"]["fetch_s"] / 1e9)
        # And the exposition says exactly what the timeline says.
        assert m[f"cicada_stall_seconds{LAB}"] == pytest.approx(s["stall_s"])
        assert m[f"cicada_pipeline_utilization{LAB}"] == pytest.approx(s["utilization"])
        assert m[f"cicada_fetch_gbps{LAB}"] == pytest.approx(s["gbps"])
        assert m[f"cicada_cold_start_time_to_first_compute_seconds{LAB}"] == pytest.approx(s["time_to_first_compute_s"])
        for stage, seconds in s["stages"].items():
            assert m[f'cicada_cold_start_stage_seconds{{model="tiny-gpt2",stage="{stage}"}}'] == pytest.approx(seconds)
        assert m['nv_model_load_duration_secs{model="tiny-gpt2",version="1"}'] == pytest.approx(s["total_s"])
        assert m[f"cicada_bytes_fetched_total{LAB}"] == i * want_bytes
        assert m[f"cicada_cold_start_seconds_count{LAB}"] == i
        assert m['cicada_cold_starts_total{model="tiny-gpt2",outcome="success"}'] == i
    (s1, _, _), (s2, m2, _) = runs
    assert m2[f"cicada_cold_start_seconds_sum{LAB}"] == pytest.approx(s1["total_s"] + s2["total_s"])

