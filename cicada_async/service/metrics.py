"""Prometheus text exposition (format 0.0.4) without a client library.

Triton's ``nv_inference_*`` names are kept so existing dashboards chart us unchanged; the
``cicada_*`` families describe cold starts. Everything here runs on the event loop only, so
plain dicts need no locks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Cold starts span milliseconds (tiny models, local disk) to minutes (large models over S3).
COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Requests per model execution (dynamic batching); 1 without batching.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# GB-seconds (2**30 bytes x s) of one cold start: 0.5 GB for 0.2 s up to 16 GB for minutes.
GB_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)
STATES = ("unloaded", "loading", "ready", "failed")
# Text generation: vLLM's buckets, so that its dashboards' quantiles read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if isinstance(v, int) or float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


@dataclass
class Family:
    """One metric family: a name, a type, a help line and samples keyed by label set."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    buckets: tuple[float, ...] = ()
    values: dict[Labels, float] = field(default_factory=dict)
    # histogram state per label set: (bucket counts, sum, count)
    hist: dict[Labels, tuple[list[int], float, int]] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(labels.items())
        self.values[key] = self.values.get(key, 0) + amount

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(labels.items())] = value

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(labels.items())
        counts, total, n = self.hist.get(key) or ([0] * len(self.buckets), 0.0, 0)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        self.hist[key] = (counts, total + value, n + 1)

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for labels, v in self.values.items():
            out.append(f"{self.name}{_fmt_labels(labels)} {_fmt_value(v)}")
        for labels, (counts, total, n) in self.hist.items():
            for bound, c in zip(self.buckets, counts):
                out.append(f"{self.name}_bucket{_fmt_labels(labels + (('le', _fmt_value(bound)),))} {c}")
            out.append(f"{self.name}_bucket{_fmt_labels(labels + (('le', '+Inf'),))} {n}")
            out.append(f"{self.name}_sum{_fmt_labels(labels)} {_fmt_value(total)}")
            out.append(f"{self.name}_count{_fmt_labels(labels)} {n}")


class Metrics:
    """The server's metric families plus gauges computed at scrape time."""

    def __init__(self) -> None:
        f = self._families = {}  # type: dict[str, Family]

        def add(name: str, kind: str, help: str, buckets: tuple[float, ...] = ()) -> Family:
            f[name] = Family(name, kind, help, buckets)
            return f[name]

        self.success = add("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes")
        self.failure = add("nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes")
        self.count = add("nv_inference_count", "counter", "Number of inferences performed (batch size 1 per request)")
        self.exec_count = add("nv_inference_exec_count", "counter", "Number of model executions performed")
        self.batch_size = add("cicada_batch_size", "histogram", "Requests per model execution (dynamic batching)", BATCH_BUCKETS)
        self.request_us = add("nv_inference_request_duration_us", "counter", "Cumulative inference request duration in microseconds")
        self.queue_us = add("nv_inference_queue_duration_us", "counter", "Cumulative inference queuing duration in microseconds")
        self.compute_us = add("nv_inference_compute_infer_duration_us", "counter", "Cumulative compute inference duration in microseconds")
        self.pending = add("nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting execution per-model")
        self.load_s = add("nv_model_load_duration_secs", "gauge", "Model load time in seconds (last load)")
        self.cold_batch = add("cicada_cold_start_batch_size", "gauge", "Requests answered by the last cold start's pipelined forward")
        self.cold_starts = add("cicada_cold_starts_total", "counter", "Cold starts (loads of an unloaded model), by outcome")
        self.cold_start_s = add("cicada_cold_start_seconds", "histogram", "Cold start duration: load start to weights resident", COLD_START_BUCKETS)
        self.gb_seconds = add("cicada_cold_start_gb_seconds", "histogram",
                              "Memory-time of a cold start as billed: peak sampled process RSS (GiB) x its duration (s)",
                              GB_SECONDS_BUCKETS)
        self.peak_rss = add("cicada_cold_start_peak_rss_bytes", "gauge",
                            "Peak sampled process RSS during the last cold start (process-wide)")
        self.cold_stage_s = add("cicada_cold_start_stage_seconds", "gauge", "Stage breakdown of the last cold start")
        self.ttfc_s = add("cicada_cold_start_time_to_first_compute_seconds", "gauge", "Load start to first layer computed, last cold start")
        self.bytes_fetched = add("cicada_bytes_fetched_total", "counter", "Weight bytes fetched from storage")
        self.stall_s = add("cicada_stall_seconds", "gauge", "Compute time spent waiting for weights in the last cold start")
        self.utilization = add("cicada_pipeline_utilization", "gauge", "Fraction of the last cold start during which compute was busy")
        self.gbps = add("cicada_fetch_gbps", "gauge", "Fetch throughput of the last cold start in GB/s")
        self.state = add("cicada_model_state", "gauge", "1 for the model's current state, 0 for the others")
        self.evictions = add("cicada_evictions_total", "counter", "Models unloaded, by reason (keep_alive, memory_budget, api)")
        self.shed = add("cicada_requests_shed_total", "counter", "Requests refused or dropped from the queue, by reason")
        self.resident = add("cicada_resident_weight_bytes", "gauge", "Weight bytes of loaded models")
        # Text generation (OpenAI and Triton generate routes): vLLM's names and model_name label,
        # so that dashboards made for vLLM chart us unchanged, as Triton's names above do.
        self.ttft_s = add("vllm:time_to_first_token_seconds", "histogram",
                          "Histogram of time to first token in seconds (from admission, tokenizing included)",
                          TTFT_BUCKETS)
        self.itl_s = add("vllm:inter_token_latency_seconds", "histogram",
                         "Histogram of inter-token latency in seconds (one observation per generated token)",
                         ITL_BUCKETS)
        self.e2e_s = add("vllm:e2e_request_latency_seconds", "histogram",
                         "Histogram of end-to-end generation request latency in seconds", E2E_BUCKETS)
        self.prompt_tokens = add("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed")
        self.generation_tokens = add("vllm:generation_tokens_total", "counter", "Number of generation tokens processed")
        self.request_success = add("vllm:request_success_total", "counter",
                                   "Count of finished generation requests, by finished_reason (stop, length, abort)")
        self.request_failure = add("cicada_generation_failures_total", "counter",
                                   "Generation requests that ended in an error, by reason")
        self.running = add("vllm:num_requests_running", "gauge", "Number of sequences in the model's running batch")
        self.waiting = add("vllm:num_requests_waiting", "gauge", "Number of sequences waiting to join the batch")
        self.kv_usage = add("vllm:kv_cache_usage_perc", "gauge", "KV cache usage: 1 means the budget is full")
        self.kv_used = add("cicada_kv_cache_used_bytes", "gauge", "KV cache bytes held by the model's sequences")
        self.kv_budget = add("cicada_kv_cache_budget_bytes", "gauge", "KV cache byte budget of the model")
        self._collectors: list[Callable[[], None]] = []

    def family(self, name: str) -> Family:
        return self._families[name]

    def add_collector(self, fn: Callable[[], None]) -> None:
        """``fn`` refreshes gauges just before each scrape."""
        self._collectors.append(fn)

    def record_cold_start(self, model: str, ok: bool, summary: dict[str, Any] | None) -> None:
        self.cold_starts.inc(model=model, outcome="success" if ok else "failure")
        if not ok or not summary:
            return
        total = float(summary.get("total_s") or 0.0)
        self.cold_start_s.observe(total, model=model)
        self.load_s.set(total, model=model, version="1")
        # Stage names come from the engine's timeline as they are (skeleton, plan, fetch_s, ...).
        for stage, seconds in (summary.get("stages") or {}).items():
            if isinstance(seconds, (int, float)):
                self.cold_stage_s.set(float(seconds), model=model, stage=str(stage))
        for fam, key in ((self.ttfc_s, "time_to_first_compute_s"), (self.stall_s, "stall_s"),
                         (self.utilization, "utilization"), (self.gbps, "gbps")):
            if summary.get(key) is not None:
                fam.set(float(summary[key]), model=model)
        memory = summary.get("memory") or {}
        if memory.get("gb_seconds") is not None:
            self.gb_seconds.observe(float(memory["gb_seconds"]), model=model)
            self.peak_rss.set(int(memory["rss_peak_bytes"]), model=model)
        if summary.get("bytes"):
            self.bytes_fetched.inc(int(summary["bytes"]), model=model)

    def render(self) -> bytes:
        for fn in self._collectors:
            fn()
        out: list[str] = []
        for fam in self._families.values():
            fam.render(out)
        out.append("")
        return "\n".join(out).encode()

    def families(self) -> Iterable[Family]:
        return self._families.values()


def parse_text(text: str) -> dict[str, float]:
    """Tiny parser for tests and the load-test summary: ``name{labels}`` -> value."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
