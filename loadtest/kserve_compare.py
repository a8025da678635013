"""Peer comparison: KServe's own Python ModelServer against ``cicada serve``, same client, same load.

  flock /tmp/cicada-bench.lock python loadtest/kserve_compare.py [--duration 15] [--rounds 2] \
      [--models bert-base,resnet-50] [--http-gbit 1] [--json bench-results/kserve-compare.json]

For each model (``cicada make-model``: real architectures, random weights): the peer
(``loadtest/kserve_peer.py``, a ``kserve.Model`` over ``from_pretrained``) and cicada (dynamic
batching on: ``max_batch_size`` 32, 8 for resnet-50, no queue delay) run side by side as
subprocesses on 127.0.0.1, and one closed-loop client (aiohttp, one pre-encoded binary V2 body,
binary outputs) drives one of them at a time at concurrency 1 and 8 for ``--duration`` seconds
per cell, after a warm-up; the cells interleave over ``--rounds`` rounds (the order reversed
every other round) and medians are reported. Latencies are raw client-side times per request.
Every 10th answer of both servers is decoded and compared with a plain PyTorch forward of the
same input, so that a broken peer cannot flatter us. Then, on cicada: one cold request to the
unloaded model against a cold burst of 32, and a warm burst of 32 (the compute alone, a floor
for any burst); then the same with the weights on nginx behind a tc-shaped veth link
(``--http-gbit``), the origin's page cache dropped before each cold start.
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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cicada_async.bench.origins import free_port, stop_process  # noqa: E402
from loadtest.run_locust import wait_ready  # noqa: E402

BURST = 32
# On this CPU resnet-50 costs more per image in batches past 8, bert-base less and less up to
# 32 (loadtest/batch_curve.py, bench-results/batch-curve.json).
MAX_BATCH = {"resnet-50": 8}
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
            "compute_us": m.get(f"nv_inference_compute_infer_duration_us{lab}", 0),
            "cold_batch": m.get(f'cicada_cold_start_batch_size{{model="{model}"}}', 0)}


def start(cmd: list[str], log: Path, url: str, model: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"))
    wait_ready(url, timeout=180)
    return proc


def cicada_cmd(model: str, uri: str, port: int, logs: Path, tag: str, server_toml: str) -> list[str]:
    cfg = logs / f"{model}-{tag}.toml"
    cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n{server_toml}\n[models.{model}]\nuri = "{uri}"\n'
                   f"keep_alive_s = 0\nmax_batch_size = {MAX_BATCH.get(model, BURST)}\n")
    return [sys.executable, "-m", "cicada_async", "serve", "--config", str(cfg)]


def bursts(url: str, model: str, payload: tuple[bytes, dict[str, str]], want: dict[str, np.ndarray],
           drop: Any = None) -> dict[str, Any]:
    """One cold request against a cold burst of 32, three times each, every one after an unload
    (both find the skeleton and plan file kept ready); ``drop`` evicts the origin's page cache
    first. Then a warm burst of 32: the compute alone, a floor for any cold burst."""
    cold, rides = [], []
    for _ in range(3):
        for n in (1, BURST):
            post(url, f"/v2/repository/models/{model}/unload")
            if drop is not None:
                drop()
            before = scrape(url, model)
            t = asyncio.run(burst(url, model, payload, want, n))
            after = scrape(url, model)
            if n == 1:
                cold.append(t)
            else:
                rides.append({"s": round(t, 4), "executions": after["exec"] - before["exec"],
                              "cold_start_batch": after["cold_batch"]})
    warm = [asyncio.run(burst(url, model, payload, want, BURST)) for _ in range(3)]
    cold_s, burst_s = statistics.median(cold), statistics.median(b["s"] for b in rides)
    return {"one_cold_request_s": [round(c, 4) for c in cold], "burst_of_32": rides,
            "warm_burst_of_32_s": [round(w, 4) for w in warm], "median_one_cold_s": round(cold_s, 4),
            "median_burst_s": round(burst_s, 4), "burst_over_cold": round(burst_s / cold_s, 3),
            "warm_burst_over_cold": round(statistics.median(warm) / cold_s, 3)}


def median_cell(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of each figure; the rounds themselves kept beside them."""
    out = {k: round(statistics.median(r[k] for r in rounds), 2) for k in ("rps", "p50_ms", "p99_ms")}
    out["errors"] = sum(r["errors"] for r in rounds)
    out["checked"] = sum(r["checked"] for r in rounds)
    out["max_abs_diff"] = max(r["max_abs_diff"] for r in rounds)
    for k in ("mean_batch", "server_compute_ms"):
        if k in rounds[0]:
            out[k] = round(statistics.median(r[k] for r in rounds), 2)
    return {**out, "rounds": rounds}


def run_model(model: str, path: Path, duration: float, rounds: int, logs: Path, servers: tuple[str, ...],
              server_toml: str, http_rate_bps: float | None) -> dict[str, Any]:
    name, x = make_input(model)
    want = reference(path, name, x)
    payload = body(name, x)
    res: dict[str, Any] = {"input": {"name": name, "shape": list(x.shape)}}
    urls: dict[str, str] = {}
    with ExitStack() as stack:
        # Both servers up at once, idle but for the cell being measured: the cells interleave, so
        # the machine's drift between minutes falls on both alike.
        for server in servers:
            port = free_port()
            urls[server] = f"http://127.0.0.1:{port}"
            cmd = ([sys.executable, str(ROOT / "loadtest/kserve_peer.py"), str(path), model, str(port)]
                   if server == "kserve" else cicada_cmd(model, str(path), port, logs, "local", server_toml))
            stack.callback(stop_process, start(cmd, logs / f"{server}-{model}.log", urls[server], model))
        for url in urls.values():
            asyncio.run(closed_loop(url, model, payload, want, 1, 0.5))  # cicada: the cold start
            asyncio.run(closed_loop(url, model, payload, want, 8, 3.0))  # warm-up
        cells: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"c1": [], "c8": []} for s in servers}
        for r in range(rounds):
            for c in (1, 8):
                for server in (servers if r % 2 == 0 else servers[::-1]):
                    url = urls[server]
                    before = scrape(url, model) if server == "cicada" else None
                    cell = asyncio.run(closed_loop(url, model, payload, want, c, duration))
                    if before is not None:
                        after = scrape(url, model)
                        cell["executions"] = after["exec"] - before["exec"]
                        served = max(1, after["requests"] - before["requests"])
                        cell["mean_batch"] = round(served / max(1, after["exec"] - before["exec"]), 2)
                        # The server's own clock: a batch's compute counts once per request in it.
                        cell["server_compute_ms"] = round((after["compute_us"] - before["compute_us"]) / served / 1e3, 2)
                    cells[server][f"c{c}"].append(cell)
        for server in servers:
            res[server] = {c: median_cell(v) for c, v in cells[server].items()}
        if "cicada" in servers:
            res["cicada"]["cold_burst"] = bursts(urls["cicada"], model, payload, want)
    if "cicada" in servers and http_rate_bps is not None:
        res["cicada"]["cold_burst_http"] = http_bursts(model, path, payload, want, logs, server_toml, http_rate_bps)
    if set(servers) != {"kserve", "cicada"}:
        return res
    k, c = res["kserve"], res["cicada"]
    res["targets"] = {
        "c8_rps_ratio": round(c["c8"]["rps"] / k["c8"]["rps"], 3), "c8_rps_at_least_2x": c["c8"]["rps"] >= 2 * k["c8"]["rps"],
        "c8_p99_no_worse": c["c8"]["p99_ms"] <= k["c8"]["p99_ms"], "c1_p50_at_or_below": c["c1"]["p50_ms"] <= k["c1"]["p50_ms"],
        "burst_within_1.5x_cold": c["cold_burst"]["burst_over_cold"] <= 1.5,
    }
    if "cold_burst_http" in c:
        res["targets"]["http_burst_within_1.5x_cold"] = c["cold_burst_http"]["burst_over_cold"] <= 1.5
    return res


def http_bursts(model: str, path: Path, payload: tuple[bytes, dict[str, str]], want: dict[str, np.ndarray],
                logs: Path, server_toml: str, rate_bps: float) -> dict[str, Any]:
    """The same bursts with the weights on an HTTP origin (nginx in a network namespace behind a
    veth pair shaped by tc to ``rate_bps``), its page cache dropped before each: scale from zero
    as it happens when the weights are not on the node."""
    from cicada_async.bench.netns import ShapedLink, available, drop_tree
    from cicada_async.bench.origins import start_http_origin

    why = available()
    if why is not None:
        return {"skipped": why}
    with ExitStack() as stack:
        link = stack.enter_context(ShapedLink(rate_bps))
        origin, server_name = start_http_origin(path.parent, Path(tempfile.mkdtemp(dir=logs, prefix="nginx-")), stack, link)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = cicada_cmd(model, f"{origin}/{path.name}/", port, logs, "http", server_toml)
        stack.callback(stop_process, start(cmd, logs / f"cicada-http-{model}.log", url, model))
        asyncio.run(closed_loop(url, model, payload, want, 1, 0.5))  # first load: plan file written
        out = bursts(url, model, payload, want, drop=lambda: drop_tree(path))
    return {"origin": f"{server_name} in a network namespace, tc tbf {rate_bps / 1e9:g} Gbit/s", **out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert-base,resnet-50")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per cell (concurrency 1 and 8)")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "cicada-kserve-models")
    ap.add_argument("--json", type=Path, default=ROOT / "bench-results/kserve-compare.json")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per cell (medians reported)")
    ap.add_argument("--http-gbit", type=float, default=1.0, help="link rate of the HTTP-origin bursts; 0: skip them")
    ap.add_argument("--servers", default="kserve,cicada", help="a subset, for experiments (no targets then)")
    ap.add_argument("--torch-threads", type=int, default=None, help="cicada's [server] torch_threads (default: its own)")
    args = ap.parse_args()
    server_toml = f"torch_threads = {args.torch_threads}\n" if args.torch_threads is not None else ""
    from cicada_async.bench.cold_start_report import script_provenance
    from cicada_async.models.catalogue import make_model

    logs = Path(tempfile.mkdtemp(prefix="cicada-kserve-compare-"))
    out: dict[str, Any] = {
        # The commit, whether the tree was dirty, the machine and the load average around the
        # run (it is shared: the load says how much else ran on its cores meanwhile).
        **script_provenance("loadtest/kserve_compare.py"), "duration_s_per_cell": args.duration, "client": "aiohttp closed loop, binary V2 in and out",
        "cicada_config": f"max_batch_size = {BURST} ({', '.join(f'{m}: {n}' for m, n in MAX_BATCH.items())}), "
                         f"max_queue_delay_us = 0, {server_toml.strip() or 'torch_threads unset'}, defaults otherwise",
        "rounds": args.rounds, "models": {},
    }
    for model in args.models.split(","):
        path = args.model_dir / model
        if not (path / "config.json").exists():
            make_model(model, path)
        out["models"][model] = run_model(model, path, args.duration, args.rounds, logs, tuple(args.servers.split(",")), server_toml,
                                       args.http_gbit * 1e9 if args.http_gbit else None)
        print(model, json.dumps(out["models"][model], indent=1), flush=True)
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} (server logs in {logs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
