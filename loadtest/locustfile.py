"""Locust users for V2 infer with a mix of priorities.

Each priority gets its own request name ("infer p1", "infer p10"), so locust's CSV carries
p50/p95/p99 per priority. Settings come from the environment (run_locust.py sets them):

  CICADA_MODEL        model name (default tiny-gpt2)
  CICADA_SEQ          input_ids length (default 16)
  CICADA_HIGH_WAIT_S  pause between a high-priority user's requests (default 0.05)
"""

from __future__ import annotations

import os

import numpy as np
import orjson
from locust import FastHttpUser, constant, task

MODEL = os.environ.get("CICADA_MODEL", "tiny-gpt2")
SEQ = int(os.environ.get("CICADA_SEQ", "16"))


def body(priority: int) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor infer request, built once per user (the client must not be the bottleneck)."""
    ids = np.random.default_rng(priority).integers(0, 200, (1, SEQ), dtype=np.int64)
    raw = ids.tobytes()
    header = orjson.dumps({
        "parameters": {"priority": priority, "binary_data_output": True},
        "inputs": [{"name": "input_ids", "shape": [1, SEQ], "datatype": "INT64",
                    "parameters": {"binary_data_size": len(raw)}}],
    })
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


class _Infer(FastHttpUser):
    abstract = True
    priority = 10

    def on_start(self) -> None:
        self._body, self._headers = body(self.priority)

    @task
    def infer(self) -> None:
        with self.client.post(f"/v2/models/{MODEL}/infer", data=self._body, headers=self._headers,
                              name=f"infer p{self.priority}", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200] if r.text else ''}")


class HighPriorityUser(_Infer):
    """Latency-sensitive traffic: one request at a time with a short pause."""

    priority = 1
    fixed_count = 1
    wait_time = constant(float(os.environ.get("CICADA_HIGH_WAIT_S", "0.05")))


class LowPriorityUser(_Infer):
    """Batch traffic that saturates the server: no pause between requests."""

    priority = 10
    wait_time = constant(0)
