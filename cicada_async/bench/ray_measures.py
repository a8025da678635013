"""The client and the measures of ``cicada bench ray-serve``: first answer, model switch, cold burst.

The same client for both apps (one ``http.client`` connection per request through Ray's
proxy); every answer is checked (status 200, at least a forward's output in bytes) and a
failure is returned, never dropped. ``ray_serve``'s docstring says what each measure times.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from cicada_async.bench.pagecache import evict_checked
from cicada_async.bench.ray_cluster import Bed
from cicada_async.bench.ray_stock import is_decoder

REPLICA_HEADERS = ("cicada-replica", "bench-replica")
REPLICA_TIME_HEADERS = ("cicada-replica-s", "bench-replica-s")  # seconds inside the model replica
# process start, constructor begun, constructor returned, request entered (epoch s; ray_wire)
REPLICA_CLOCK_HEADERS = ("cicada-replica-clock", "bench-replica-clock")


def ray_path(sent: float, clock: str | None) -> dict[str, float] | None:
    """A first answer's wait before its replica ran it, split by the replica's clock header:
    Ray starting the worker process, the process until the constructor (Ray's worker start, the
    class's module imported), the constructor, and Ray routing to the replica after it."""
    if not clock:
        return None
    try:
        process, init_begin, init_end, entered = (float(x) if x != "-" else None for x in clock.split())
    except ValueError:
        return None
    if process is None or init_begin is None or init_end is None or entered is None:
        return None
    return {"process_after_send_s": process - sent, "init_after_process_s": init_begin - process,
            "init_s": init_end - init_begin, "entered_after_init_s": entered - init_end,
            "entered_after_send_s": entered - sent}


def request_body(model_dir: Path, seq: int) -> tuple[bytes, int]:
    """The V2 JSON body, and the fewest bytes a real answer has (fp16 lower bound)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = int(cfg["vocab_size"])
    decoder = is_decoder(str(model_dir))
    width = vocab if decoder else int(cfg.get("hidden_size") or cfg.get("n_embd"))
    out = "logits" if decoder else "last_hidden_state"
    data = [(i * 7919) % vocab for i in range(seq)]
    body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, seq], "data": data}],
            "outputs": [{"name": out}], "parameters": {"binary_data_output": True}}
    return json.dumps(body).encode(), seq * width * 2


class Client:
    """One HTTP connection per request through Ray's proxy; the same code for both apps."""

    def __init__(self, port: int, bodies: dict[str, tuple[bytes, int]], timeout_s: float) -> None:
        self.port, self.bodies, self.timeout_s = port, bodies, timeout_s

    def infer(self, strategy: str, model: str) -> dict[str, Any]:
        body, least = self.bodies[model]
        headers = {"Content-Type": "application/json"}
        if strategy == "stock":
            headers["serve_multiplexed_model_id"] = model
        t0, sent = time.monotonic(), time.time()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        try:
            conn.request("POST", f"/{strategy}/v2/models/{model}/infer", body=body, headers=headers)
            r = conn.getresponse()
            raw = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
        except Exception as e:  # noqa: BLE001 - a failure, counted, never dropped
            return {"ok": False, "failure": f"{type(e).__name__}: {e}", "s": time.monotonic() - t0,
                    "t_end": time.monotonic()}
        finally:
            conn.close()
        t1 = time.monotonic()
        replica = next((hdrs[h] for h in REPLICA_HEADERS if h in hdrs), None)
        inside = next((float(hdrs[h]) for h in REPLICA_TIME_HEADERS if h in hdrs), None)
        out: dict[str, Any] = {"s": t1 - t0, "t_end": t1, "status": r.status, "bytes": len(raw),
                               "replica": replica, "replica_s": inside, "node": hdrs.get("cicada-node") or hdrs.get("bench-node"),
                               "ray_path": ray_path(sent, next((hdrs[h] for h in REPLICA_CLOCK_HEADERS if h in hdrs), None))}
        out["ok"] = r.status == 200 and len(raw) >= least
        if not out["ok"]:
            out["error"] = raw[:300].decode(errors="replace") if r.status != 200 else \
                f"answer of {len(raw)} bytes, fewer than a forward's output ({least})"
        return out


    def cold_start(self, model: str) -> dict[str, Any]:
        """Cicada's last cold start of ``model`` as the replica that holds it tells it
        (``/metrics?model=``: the engine's timeline, by stage): where a switch's time went."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        try:
            conn.request("GET", f"/cicada/metrics?model={model}")
            r = conn.getresponse()
            text = r.read().decode(errors="replace")
        finally:
            conn.close()
        if r.status != 200:
            return {"error": f"{r.status}: {text[:200]}"}
        out: dict[str, Any] = {"stages_s": {}}
        names = {"nv_model_load_duration_secs": "load_s", "cicada_cold_start_time_to_first_compute_seconds": "ttfc_s",
                 "cicada_stall_seconds": "stall_s", "cicada_fetch_gbps": "gbps"}
        for line in text.splitlines():
            if line.startswith("#") or f'model="{model}"' not in line:
                continue
            series, _, value = line.rpartition(" ")
            name = series.split("{", 1)[0]
            if name == "cicada_cold_start_stage_seconds":
                stage = series.split('stage="', 1)[1].split('"', 1)[0]
                out["stages_s"][stage] = float(value)
            elif name in names:
                out[names[name]] = float(value)
        return out


def _check(r: dict[str, Any], what: str) -> None:
    if not r["ok"]:
        raise RuntimeError(f"{what}: {r.get('failure') or r.get('error')} (status {r.get('status')})")


def first_answer(bed: Bed, client: Client, strategy: str, model: str, model_dir: Path,
                 seen: set[str], zero_timeout_s: float) -> dict[str, Any]:
    waited = bed.wait_zero(zero_timeout_s)
    resident = evict_checked(model_dir)
    r = client.infer(strategy, model)
    _check(r, "first answer")
    if r["replica"] in seen:
        raise RuntimeError(f"answered by replica {r['replica']}, not a fresh one")
    seen.add(r["replica"])
    return {"first_answer_s": r["s"], "first_answer_replica_s": r["replica_s"], "replica": r["replica"], "node": r["node"], "bytes": r["bytes"],
            "resident_after_evict_bytes": resident, "waited_for_zero_s": waited,
            **{f"first_answer_{k}": v for k, v in (r["ray_path"] or {}).items()}}


def warm_replica(bed: Bed, client: Client, strategy: str, model_a: str, seen: set[str],
                 zero_timeout_s: float) -> dict[str, Any]:
    """From zero replicas, a fresh replica that holds ``model_a`` (its first and a warm answer)."""
    waited = bed.wait_zero(zero_timeout_s)
    first = client.infer(strategy, model_a)
    _check(first, f"warming with {model_a}")
    warm = client.infer(strategy, model_a)
    _check(warm, f"warm request for {model_a}")
    if first["replica"] in seen:
        raise RuntimeError(f"warmed replica {first['replica']} is not a fresh one")
    seen.add(first["replica"])
    return {"from_model": model_a, "a_first_s": first["s"], "a_warm_s": warm["s"],
            "a_warm_replica_s": warm["replica_s"], "replica": first["replica"],
            "node": first["node"], "waited_for_zero_s": waited}


def switch(bed: Bed, client: Client, strategy: str, model_a: str, model_b: str, dir_b: Path,
           seen: set[str], zero_timeout_s: float) -> dict[str, Any]:
    out = warm_replica(bed, client, strategy, model_a, seen, zero_timeout_s)
    out["resident_after_evict_bytes"] = evict_checked(dir_b)
    r = client.infer(strategy, model_b)
    _check(r, f"switch to {model_b}")
    if r["replica"] != out["replica"]:
        raise RuntimeError(f"{model_b} answered by {r['replica']}, not by {model_a}'s replica {out['replica']}")
    out.update({"switch_s": r["s"], "switch_replica_s": r["replica_s"], "bytes": r["bytes"]})
    if strategy == "cicada":
        out["cold_start"] = client.cold_start(model_b)
    return out


def burst(bed: Bed, client: Client, strategy: str, model_a: str, model_b: str, dir_b: Path, n: int,
          seen: set[str], zero_timeout_s: float) -> dict[str, Any]:
    out = warm_replica(bed, client, strategy, model_a, seen, zero_timeout_s)
    out["resident_after_evict_bytes"] = evict_checked(dir_b)
    gate = threading.Barrier(n + 1)
    released: list[float] = []

    def one() -> dict[str, Any]:
        gate.wait()
        return client.infer(strategy, model_b)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(one) for _ in range(n)]
        gate.wait()
        released.append(time.monotonic())
        answers: list[dict[str, Any]] = []
        for f in futs:
            try:
                answers.append(f.result(timeout=client.timeout_s + 30))
            except Exception as e:  # noqa: BLE001 - a hang past the client's own timeout
                answers.append({"ok": False, "failure": f"{type(e).__name__}: {e}", "s": None, "t_end": None})
    t0 = released[0]
    lat = [a["s"] for a in answers if a["ok"]]
    ends = [a["t_end"] for a in answers if a.get("t_end") is not None]
    out.update({
        "n": n,
        "answered": sum(1 for a in answers if a["ok"]),
        "errors": sum(1 for a in answers if not a["ok"] and "status" in a),
        "failures": sum(1 for a in answers if "status" not in a),
        "statuses": sorted(a.get("status", 0) for a in answers),
        "all_answered_s": max(ends) - t0 if ends else None,
        "latency_median_s": statistics.median(lat) if lat else None,
        "latency_max_s": max(lat) if lat else None,
        "latencies_s": [a["s"] for a in answers],
        "replicas": sorted({str(a.get("replica")) for a in answers if a["ok"]}),
        "problems": [a.get("failure") or a.get("error") for a in answers if not a["ok"]][:4],
    })
    return out
