"""``cicada bench multi-model``: many models on one server, a heavy-tailed trace, mixed priorities.

One run serves the same trace twice from a fresh ``cicada serve`` each time: with compute and
fetch bandwidth shared by priority (what we ship), and with ``serialize_loads`` (a waiting cold
start keeps all compute, read slots in arrival order: the engine before the executor rework).
The memory budget forces evictions. A second phase measures a priority-1 request for an
unloaded model while priority-10 loads are in flight, against the same cold start alone.
The analysis is in ``multi_model_report``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from cicada_async.bench.cold_start import drop_page_cache
from cicada_async.bench.multi_model_report import analyse, format_report, machine
from cicada_async.bench.origins import free_port, stop_process

MODELS = ("tiny-mlp", "tiny-bert", "resnet-50", "gpt2", "bert-base", "vit-base")
REQUEST_TIMEOUT_S = 60.0  # a request still unanswered after this is counted as hung


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds after the trace starts
    model: str
    priority: int


def make_trace(duration_s: float, seed: int = 7) -> list[Arrival]:
    """A few hot models, many rare ones, bursts (the shape of the Azure Functions trace).

    tiny-mlp: steady Poisson, 15/s, priority 1. tiny-bert: 4/s with bursts of 25/s for 2 s
    every 12 s, priority 1 or 5. resnet-50: 1/s, priority 5. gpt2, bert-base, vit-base: rare,
    a burst of 2-4 requests at a few random moments, priority 10.
    """
    rng = random.Random(seed)
    out: list[Arrival] = []

    def poisson(model: str, rate: float, prio: Any, start: float = 0.0, end: float = duration_s) -> None:
        t = start + rng.expovariate(rate)
        while t < end:
            out.append(Arrival(round(t, 4), model, prio() if callable(prio) else prio))
            t += rng.expovariate(rate)

    poisson("tiny-mlp", 15.0, 1)
    poisson("tiny-bert", 4.0, lambda: rng.choice((1, 5)))
    b = 3.0
    while b < duration_s:
        poisson("tiny-bert", 25.0, lambda: rng.choice((1, 5)), b, min(b + 2.0, duration_s))
        b += 12.0
    poisson("resnet-50", 1.0, 5)
    for model in ("gpt2", "bert-base", "vit-base"):
        for _ in range(max(1, int(duration_s / 15))):
            t0 = rng.uniform(1.0, duration_s - 2.0)
            for k in range(rng.randint(2, 4)):
                out.append(Arrival(round(t0 + 0.05 * k, 4), model, 10))
    return sorted(out, key=lambda a: a.t)


# -- the server -------------------------------------------------------------------------------
def write_config(path: Path, port: int, dirs: dict[str, Path], budget: int, serialized: bool) -> None:
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", f"memory_budget_bytes = {budget}",
             "keep_alive_check_s = 0.2", f"serialize_loads = {'true' if serialized else 'false'}", ""]
    for name, d in dirs.items():
        lines += [f'[models."{name}"]', f'uri = "{d}"']
        if name in ("gpt2", "bert-base", "vit-base"):
            lines.append("keep_alive_s = 15.0")  # rare models scale to zero between bursts
        lines.append("")
    path.write_text("\n".join(lines))


def start_server(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cicada_async.cli", "serve", "--config", str(config)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cicada serve exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError("cicada serve did not become ready in 120 s")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- the client -------------------------------------------------------------------------------
def binary_body(meta: dict[str, Any], seed: int) -> tuple[bytes, int]:
    """A binary-tensor V2 body for the model's first input (ids for text, pixels for images)."""
    inp = meta["inputs"][0]
    rng = np.random.default_rng(seed)
    if inp["datatype"] == "INT64":
        shape = [1, 16]  # 16 tokens
        arr = rng.integers(0, 200, shape, dtype=np.int64)  # inside every model's vocabulary
    else:
        shape = [1 if d == -1 else int(d) for d in inp["shape"]]  # the model's example shape
        arr = rng.standard_normal(shape).astype(np.float32)
    raw = arr.tobytes()
    header = json.dumps({
        "inputs": [{"name": inp["name"], "datatype": inp["datatype"], "shape": shape,
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    return header + raw, len(header)


class Client:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base, self.session = base, session
        self.bodies: dict[str, tuple[bytes, int]] = {}
        self.t0 = 0.0

    async def prepare(self, models: tuple[str, ...]) -> None:
        for m in models:
            async with self.session.get(f"{self.base}/v2/models/{m}") as r:
                self.bodies[m] = binary_body(await r.json(), seed=len(m))

    async def infer(self, model: str, priority: int) -> dict[str, Any]:
        body, hlen = self.bodies[model]
        url = f"{self.base}/v2/models/{model}/infer"
        # The priority rides in the header JSON; patch it in without re-encoding the tensor.
        head = json.loads(body[:hlen])
        head["parameters"]["priority"] = priority
        h = json.dumps(head).encode()
        sent = time.perf_counter() - self.t0
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async with self.session.post(url, data=h + body[hlen:], headers={
                        "Inference-Header-Content-Length": str(len(h)),
                        "Content-Type": "application/octet-stream"}) as r:
                    await r.read()
                    status = r.status
        except TimeoutError:
            status = -1  # hung
        except aiohttp.ClientError:
            status = -2  # lost: connection failed
        return {"model": model, "priority": priority, "sent": sent,
                "done": time.perf_counter() - self.t0, "status": status}

    async def post(self, path: str) -> int:
        async with self.session.post(f"{self.base}{path}", json={}) as r:
            await r.read()
            return r.status

    async def states(self) -> dict[str, str]:
        async with self.session.post(f"{self.base}/v2/repository/index", json={}) as r:
            return {m["name"]: m["state"] for m in await r.json()}

    async def metrics(self) -> str:
        async with self.session.get(f"{self.base}/metrics") as r:
            return await r.text()


async def _sample(client: Client, pid: int, stop: asyncio.Event, states: list[Any], rss: list[Any]) -> None:
    while not stop.is_set():
        t = time.perf_counter() - client.t0
        try:
            states.append((t, await client.states()))
            rss.append((t, rss_bytes(pid)))
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.02)


async def _settled_rss(pid: int, client: Client) -> int:
    """RSS once the idle server has finished its start-up work (the warm transformers import)."""
    last, stable_since, t_end = rss_bytes(pid), time.monotonic(), time.monotonic() + 30
    while time.monotonic() < t_end:
        await asyncio.sleep(0.25)
        now = rss_bytes(pid)
        if abs(now - last) > 2 << 20:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 2.0:
            break
    return last


async def run_mode(dirs: dict[str, Path], trace: list[Arrival], budget: int, serialized: bool,
                   tmp: Path) -> dict[str, Any]:
    port = free_port()
    cfg = tmp / f"multi-{'serial' if serialized else 'shared'}.toml"
    write_config(cfg, port, dirs, budget, serialized)
    for d in dirs.values():
        drop_page_cache(d)
    proc = start_server(cfg, port, tmp / (cfg.stem + ".log"))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            client = Client(f"http://127.0.0.1:{port}", session)
            await client.prepare(tuple(dirs))
            baseline = await _settled_rss(proc.pid, client)
            states: list[Any] = []
            rss: list[Any] = []
            stop = asyncio.Event()
            client.t0 = time.perf_counter()
            sampler = asyncio.create_task(_sample(client, proc.pid, stop, states, rss))

            async def at(a: Arrival) -> dict[str, Any]:
                await asyncio.sleep(max(0.0, a.t - (time.perf_counter() - client.t0)))
                return await client.infer(a.model, a.priority)

            results = await asyncio.gather(*(at(a) for a in trace))
            urgent = await priority_phase(client)
            stop.set()
            await sampler
            metrics = await client.metrics()
    finally:
        stop_process(proc)
    return {"serialized": serialized, "results": list(results), "states": states, "rss": rss,
            "rss_baseline": baseline, "metrics": metrics, "priority_phase": urgent}


async def priority_phase(client: Client, urgent: str = "bert-base",
                         lazy: tuple[str, ...] = ("vit-base", "resnet-50")) -> dict[str, Any]:
    """A priority-1 request for an unloaded model, alone and while priority-10 loads run."""
    async def unload_all() -> None:
        # Every model, not only these three: no measurement may include an eviction the other
        # one does not (the trace leaves the budget nearly full).
        for m in client.bodies:
            await client.post(f"/v2/repository/models/{m}/unload")

    await unload_all()
    await client.infer(urgent, 1)  # the page cache holds its weights in both measurements
    await unload_all()
    alone = await client.infer(urgent, 1)
    await unload_all()
    for m in lazy:  # warm their page cache too: equal terms for the loads in flight
        await client.infer(m, 10)
    await unload_all()
    lazy_tasks = [asyncio.create_task(client.infer(m, 10)) for m in lazy]
    await asyncio.sleep(0.05)
    contended = await client.infer(urgent, 1)
    lazies = await asyncio.gather(*lazy_tasks)
    return {"urgent": urgent, "lazy": list(lazy), "alone": alone, "contended": contended, "lazy_results": lazies}


def multi_model_bench(args: argparse.Namespace) -> int:
    from cicada_async.models.catalogue import make_model

    dirs: dict[str, Path] = {}
    for name in MODELS:
        d = args.dir / name
        if not ((d / "config.json").exists() or (d / "cicada.json").exists()):
            make_model(name, d)
        dirs[name] = d
    trace = make_trace(args.duration, args.seed)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="cicada-multi-") as t:
        modes = [asyncio.run(run_mode(dirs, trace, args.budget, serialized, Path(t)))
                 for serialized in (False, True)]
    report = analyse(modes, dirs, args.budget)
    doc = {
        "command": " ".join(["cicada", "bench", "multi-model", *sys.argv[3:]]) if len(sys.argv) > 2 else "cicada bench multi-model",
        "commit": _commit(), "machine": machine(), "started": started,
        "settings": {"duration_s": args.duration, "seed": args.seed, "budget_bytes": args.budget,
                     "models": {n: str(d) for n, d in dirs.items()}, "requests": len(trace)},
        "trace": [asdict(a) for a in trace],
        "report": report,
        "raw": [{k: v for k, v in m.items() if k != "metrics"} for m in modes],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1))
    print(format_report(report))
    print(f"\nwritten: {args.json}")
    return 0 if report["ok"] else 1


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
