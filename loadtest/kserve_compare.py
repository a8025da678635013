"""Peer comparison: KServe's own Python ModelServer against ``cicada serve``, same client, same load.

  flock /tmp/cicada-bench.lock python loadtest/kserve_compare.py [--duration 15] \
      [--models bert-base,resnet-50] [--json bench-results/kserve-compare.json]

For each model (``cicada make-model``: real architectures, random weights): the peer
(``loadtest/kserve_peer.py``, a ``kserve.Model`` over ``from_pretrained``) and cicada (dynamic
batching on: ``max_batch_size = 32``, no queue delay) are started in turn as subprocesses on
127.0.0.1 and driven by one closed-loop client (aiohttp, one pre-encoded binary V2 body, binary
outputs) at concurrency 1 and 8 for ``--duration`` seconds each, after a warm-up. Latencies are
raw client-side times per request. Every 10th answer of both servers is decoded and compared
with a plain PyTorch forward of the same input, so that a broken peer cannot flatter us. Then,
on cicada: one cold request to the unloaded model, timed, against a burst of 32 to the unloaded
model (each after an unload, so both find the skeleton and plan file kept ready).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadtest.run_locust import free_port, wait_ready  # noqa: E402

BURST = 32
CHECK_EVERY = 10


def make_input(model: str) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if model.startswith("resnet"):
        return "pixel_values", rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
    return "input_ids", rng.integers(0, 1000, (1, 16), dtype=np.int64)


def reference(path: Path, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The plain PyTorch forward of the same weights: from_pretrained, eval, forward."""
    import torch
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(str(path)).eval()
    with torch.inference_mode():
        out = model(**{name: torch.from_numpy(x)})
    return {k: v.numpy().copy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def body(name: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = x.tobytes()
    dt = {"int64": "INT64", "float32": "FP32"}[str(x.dtype)]
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": dt,
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def decode(data: bytes, header_len: str | None) -> dict[str, np.ndarray]:
    """A V2 response, binary outputs or JSON ``data``, as arrays."""
    n = int(header_len) if header_len else len(data)
    doc = json.loads(data[:n])
    out, pos = {}, n
    for o in doc["outputs"]:
        dtype = {"FP32": np.float32, "INT64": np.int64, "FP16": np.float16}[o["datatype"]]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[o["name"]] = np.frombuffer(data[pos:pos + size], dtype=dtype).reshape(o["shape"])
            pos += size
        else:
            out[o["name"]] = np.asarray(o["data"], dtype=dtype).reshape(o["shape"])
    return out


def max_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    missing = set(want) - set(got)
    if missing:
        raise SystemExit(f"answer lacks outputs {sorted(missing)}")
    return max(float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in want)


async def closed_loop(url: str, model: str, payload: tuple[bytes, dict[str, str]], want: dict[str, np.ndarray],
                      concurrency: int, duration: float) -> dict[str, Any]:
    import aiohttp

    data, headers = payload
    lat: list[float] = []
    errors, diffs = 0, [0.0]
    end = time.perf_counter() + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                async with s.post(f"{url}/v2/models/{model}/infer", data=data, headers=headers) as r:
                    raw = await r.read()
                    ok = r.status == 200
                    hl = r.headers.get("Inference-Header-Content-Length")
                lat.append(time.perf_counter() - t)
                if not ok:
                    errors += 1
                elif len(lat) % CHECK_EVERY == 1:
                    diffs.append(max_diff(decode(raw, hl), want))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "errors": errors, "rps": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2), "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
            "checked": len(diffs) - 1, "max_abs_diff": max(diffs)}


async def burst(url: str, model: str, payload: tuple[bytes, dict[str, str]], want: dict[str, np.ndarray], n: int) -> float:
    import aiohttp

    data, headers = payload
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as s:
        async def one() -> None:
            async with s.post(f"{url}/v2/models/{model}/infer", data=data, headers=headers) as r:
                raw = await r.read()
                if r.status != 200:
                    raise SystemExit(f"burst request failed: {r.status} {raw[:200]!r}")
                max_diff(decode(raw, r.headers.get("Inference-Header-Content-Length")), want)
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - t0


def post(url: str, path: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url + path, data=b"", method="POST"), timeout=600).close()


def scrape(url: str, model: str) -> dict[str, float]:
    from cicada_async.service.metrics import parse_text

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        m = parse_text(r.read().decode())
    lab = f'{{model="{model}",version="1"}}'
    return {"exec": m.get(f"nv_inference_exec_count{lab}", 0), "requests": m.get(f"nv_inference_request_success{lab}", 0),
            "cold_batch": m.get(f'cicada_cold_start_batch_size{{model="{model}"}}', 0)}


def start(cmd: list[str], log: Path, url: str, model: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))
    wait_ready(url, timeout=180)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    mem = next(line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    import torch
    # The machine is shared: the load average says how much else ran on its cores meanwhile.
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_total": mem, "torch": torch.__version__,
            "loadavg_before": os.getloadavg()}


def run_model(model: str, path: Path, duration: float, logs: Path) -> dict[str, Any]:
    name, x = make_input(model)
    want = reference(path, name, x)
    payload = body(name, x)
    res: dict[str, Any] = {"input": {"name": name, "shape": list(x.shape)}}
    for server in ("kserve", "cicada"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if server == "kserve":
            cmd = [sys.executable, str(ROOT / "loadtest/kserve_peer.py"), str(path), model, str(port)]
        else:
            cfg = logs / f"{model}.toml"
            cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n[models.{model}]\nuri = "{path}"\n'
                           f"keep_alive_s = 0\nmax_batch_size = {BURST}\n")
            cmd = [sys.executable, "-m", "cicada_async", "serve", "--config", str(cfg)]
        proc = start(cmd, logs / f"{server}-{model}.log", url, model)
        try:
            asyncio.run(closed_loop(url, model, payload, want, 1, 0.5))  # cicada: the cold start
            asyncio.run(closed_loop(url, model, payload, want, 8, 3.0))  # warm-up
            cells: dict[str, Any] = {}
            for c in (1, 8):
                before = scrape(url, model) if server == "cicada" else None
                cells[f"c{c}"] = asyncio.run(closed_loop(url, model, payload, want, c, duration))
                if before is not None:
                    after = scrape(url, model)
                    cells[f"c{c}"]["executions"] = after["exec"] - before["exec"]
                    cells[f"c{c}"]["mean_batch"] = round((after["requests"] - before["requests"]) / max(1, after["exec"] - before["exec"]), 2)
            if server == "cicada":
                cold, bursts = [], []
                for _ in range(3):
                    post(url, f"/v2/repository/models/{model}/unload")
                    cold.append(asyncio.run(burst(url, model, payload, want, 1)))
                    post(url, f"/v2/repository/models/{model}/unload")
                    before = scrape(url, model)
                    t = asyncio.run(burst(url, model, payload, want, BURST))
                    after = scrape(url, model)
                    bursts.append({"s": round(t, 4), "executions": after["exec"] - before["exec"],
                                   "cold_start_batch": after["cold_batch"]})
                cold_s = statistics.median(cold)
                burst_s = statistics.median(b["s"] for b in bursts)
                cells["cold_burst"] = {"one_cold_request_s": [round(c, 4) for c in cold], "burst_of_32": bursts,
                                       "median_one_cold_s": round(cold_s, 4), "median_burst_s": round(burst_s, 4),
                                       "burst_over_cold": round(burst_s / cold_s, 3)}
            res[server] = cells
        finally:
            stop(proc)
    k, c = res["kserve"], res["cicada"]
    res["targets"] = {
        "c8_rps_ratio": round(c["c8"]["rps"] / k["c8"]["rps"], 3), "c8_rps_at_least_2x": c["c8"]["rps"] >= 2 * k["c8"]["rps"],
        "c8_p99_no_worse": c["c8"]["p99_ms"] <= k["c8"]["p99_ms"], "c1_p50_at_or_below": c["c1"]["p50_ms"] <= k["c1"]["p50_ms"],
        "burst_within_1.5x_cold": c["cold_burst"]["burst_over_cold"] <= 1.5,
    }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert-base,resnet-50")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per cell (concurrency 1 and 8)")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "cicada-kserve-models")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results/kserve-compare.json")
    args = ap.parse_args()
    from cicada_async.models.catalogue import make_model

    logs = Path(tempfile.mkdtemp(prefix="cicada-kserve-compare-"))
    out: dict[str, Any] = {
        "command": " ".join(["python", "loadtest/kserve_compare.py", *sys.argv[1:]]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "machine": machine(), "duration_s_per_cell": args.duration, "client": "aiohttp closed loop, binary V2 in and out",
        "cicada_config": f"max_batch_size = {BURST}, max_queue_delay_us = 0, defaults otherwise", "models": {},
    }
    for model in args.models.split(","):
        path = args.model_dir / model
        if not (path / "config.json").exists():
            make_model(model, path)
        out["models"][model] = run_model(model, path, args.duration, logs)
        print(model, json.dumps(out["models"][model], indent=1), flush=True)
    out["machine"]["loadavg_after"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} (server logs in {logs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
