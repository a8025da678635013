"""A bounded soak of a real ``cicada serve`` process, sampling its RSS, threads and fds.

    python loadtest/soak.py --duration 600            # by hand: minutes
    python loadtest/soak.py --duration 30 --out s.json  # CI (tests/service/test_hardening_soak.py)

Traffic, all at once for ``--duration`` seconds against three tiny models:
* warm: ``--warm-workers`` clients sending back to back to a model that is never unloaded;
* cycle: infer (cold start), explicit unload, infer again, in a loop;
* keep-alive: a model with keep_alive_s=1 asked every ~2 s, so each request is a cold start;
* bad: malformed requests (each must be a 400);
* abandon: requests whose client gives up after a few ms (must leave nothing behind).

Every 200 is compared bit for bit with the first answer for the same model and input, cold or
warm (exactness against plain PyTorch is tests/service/test_server_models.py's job). The server
process is sampled every second with psutil; growth is measured from the end of the warm-up
(first 25 %) to an idle sample after traffic stops and connections are closed.
Bounds: RSS growth < 50 MB, threads and fds not above their warm-up values (+2 slack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cicada_async.bench.origins import free_port

RSS_BOUND_MB = 50.0
SLACK = 2  # threads/fds above the warm-up value still counted as flat


@dataclass
class Sample:
    t: float
    rss_mb: float
    threads: int
    fds: int


class ServerProcess:
    """``python -m cicada_async serve --config ...`` on 127.0.0.1:<free port>."""

    def __init__(self, config_toml: str, workdir: Path, env: dict[str, str] | None = None,
                 torch_threads: int = 1) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "cicada.toml"
        self.config.write_text(config_toml)
        self.log_path = workdir / "server.log"
        self.env = {**os.environ, **(env or {})}
        self.torch_threads = torch_threads
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        root = Path(__file__).resolve().parents[1]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cicada_async", "serve", "--config", str(self.config), "--host", "127.0.0.1",
             "--port", str(self.port), "--torch-threads", str(self.torch_threads)],
            cwd=root, env={**self.env, "PYTHONPATH": str(root)}, stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout} s: {self.log()[-2000:]}")

    def sample(self) -> Sample:
        import psutil

        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        return Sample(time.monotonic(), p.memory_info().rss / 2**20, p.num_threads(), p.num_fds())

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- traffic ----------------------------------------------------------------------------------------
@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    expected_errors: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    wrong: int = 0
    abandoned: int = 0
    unloads: int = 0


def _body(seed: int, seq: int = 8) -> bytes:
    ids = np.random.default_rng(seed).integers(0, 200, (1, seq), dtype=np.int64)
    doc = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape),
                       "data": ids.reshape(-1).tolist()}],
           "parameters": {"binary_data_output": True}}
    return json.dumps(doc).encode()


BAD_BODIES = [
    b"{not json",
    json.dumps({"inputs": [{"name": "input_ids", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}).encode(),
    json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2]}]}).encode(),
    json.dumps({"inputs": []}).encode(),
]


async def soak(url: str, duration: float, warm_workers: int, models: dict[str, str]) -> Tally:
    """Run the mixed traffic against ``url``; ``models`` maps role (warm/cycle/keepalive) to name."""
    import aiohttp

    tally = Tally()
    answers: dict[tuple[str, int], bytes] = {}
    end = time.monotonic() + duration
    timeout = aiohttp.ClientTimeout(total=60)

    async def infer(s: aiohttp.ClientSession, model: str, seed: int, kind: str) -> None:
        tally.sent[kind] += 1
        try:
            async with s.post(f"/v2/models/{model}/infer", data=_body(seed)) as r:
                body = await r.read()
                if r.status != 200:
                    tally.failures.append(f"{kind} {model}: {r.status} {body[:200]!r}")
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            tally.failures.append(f"{kind} {model}: {type(e).__name__} {e}")
            return
        tally.ok[kind] += 1
        want = answers.setdefault((model, seed), body)
        if body != want:
            tally.wrong += 1
            tally.failures.append(f"{kind} {model}: answer differs from the first one for seed {seed}")

    async def warm(s: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while time.monotonic() < end:
            await infer(s, models["warm"], (i * 7 + n) % 4, "warm")
            n += 1

    async def cycle(s: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() < end:
            await infer(s, models["cycle"], n % 4, "cold_cycle")
            async with s.post(f"/v2/repository/models/{models['cycle']}/unload") as r:
                if r.status != 200:
                    tally.failures.append(f"unload: {r.status}")
                tally.unloads += 1
            n += 1

    async def keepalive(s: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() < end:
            await infer(s, models["keepalive"], n % 4, "cold_keepalive")
            n += 1
            await asyncio.sleep(2.0)  # > keep_alive_s + one check: unloaded in between

    async def bad(s: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() < end:
            tally.sent["bad"] += 1
            async with s.post(f"/v2/models/{models['warm']}/infer", data=BAD_BODIES[n % len(BAD_BODIES)]) as r:
                await r.read()
                if r.status == 400:
                    tally.expected_errors["bad->400"] += 1
                else:
                    tally.failures.append(f"bad body {n % len(BAD_BODIES)}: {r.status}")
            n += 1
            await asyncio.sleep(0.05)

    async def abandon() -> None:
        # A fresh session each time: a client that hangs up mid-request, as killed clients do.
        n = 0
        while time.monotonic() < end:
            tally.sent["abandon"] += 1
            try:
                async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=0.003)) as s2:
                    async with s2.post(f"/v2/models/{models['warm']}/infer", data=_body(n % 4, seq=64)) as r:
                        await r.read()
            except (asyncio.TimeoutError, aiohttp.ClientError):
                tally.abandoned += 1
            n += 1
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(url, timeout=timeout) as s:
        await asyncio.gather(*(warm(s, i) for i in range(warm_workers)), cycle(s), keepalive(s), bad(s), abandon())
    return tally


def default_config(models_root: Path) -> str:
    return f"""
[server]
keep_alive_check_s = 0.5
shutdown_timeout_s = 10

[models.warm]
uri = "{models_root / 'tiny-gpt2'}"
keep_alive_s = 0

[models.cycle]
uri = "{models_root / 'tiny-mlp'}"
keep_alive_s = 0

[models.keepalive]
uri = "{models_root / 'tiny-bert'}"
keep_alive_s = 1
"""


def make_models(root: Path) -> Path:
    from cicada_async.models.catalogue import make_model

    for name in ("tiny-gpt2", "tiny-mlp", "tiny-bert"):
        if not (root / name).exists():
            make_model(name, root / name, seed=1)
    return root


def run(duration: float, models_root: Path | None = None, warm_workers: int = 3,
        sample_s: float = 1.0) -> dict[str, Any]:
    """Start a server, soak it, stop it with SIGTERM; the summary (with ``passed``)."""
    with tempfile.TemporaryDirectory(prefix="cicada-soak-") as tmp:
        work = Path(tmp)
        root = models_root or make_models(work / "models")
        server = ServerProcess(default_config(root), work).start()
        samples: list[Sample] = [server.sample()]
        try:
            async def main() -> Tally:
                async def sampler() -> None:
                    while True:
                        await asyncio.sleep(sample_s)
                        samples.append(server.sample())
                task = asyncio.create_task(sampler())
                try:
                    return await soak(server.url, duration, warm_workers,
                                      {"warm": "warm", "cycle": "cycle", "keepalive": "keepalive"})
                finally:
                    task.cancel()
            t0 = time.monotonic()
            tally = asyncio.run(main())
            wall = time.monotonic() - t0
            time.sleep(1.5)  # idle: keep-alive connections closed by the client, unloads settled
            final = server.sample()
        finally:
            rc = server.stop()
        warm_idx = max(1, int(len(samples) * 0.25))
        warm = samples[min(warm_idx, len(samples) - 1)]
        peak = max(samples + [final], key=lambda s: s.rss_mb)
        summary: dict[str, Any] = {
            "duration_s": round(wall, 1),
            "requests_sent": dict(tally.sent), "requests_ok": dict(tally.ok),
            "expected_errors": dict(tally.expected_errors), "abandoned_by_client": tally.abandoned,
            "unload_calls": tally.unloads, "wrong_answers": tally.wrong,
            "failures": len(tally.failures), "failure_examples": tally.failures[:10],
            "rss_mb": {"start": round(samples[0].rss_mb, 1), "after_warmup": round(warm.rss_mb, 1),
                       "peak": round(peak.rss_mb, 1), "final_idle": round(final.rss_mb, 1)},
            "rss_growth_mb": round(final.rss_mb - warm.rss_mb, 1),
            "threads": {"after_warmup": warm.threads, "max": max(s.threads for s in samples), "final_idle": final.threads},
            "fds": {"after_warmup": warm.fds, "max": max(s.fds for s in samples), "final_idle": final.fds},
            "exit_code_after_sigterm": rc,
            "bounds": {"rss_growth_mb": RSS_BOUND_MB, "threads_fds_slack": SLACK},
        }
        summary["passed"] = bool(
            tally.wrong == 0 and not tally.failures and summary["rss_growth_mb"] < RSS_BOUND_MB
            and final.threads <= warm.threads + SLACK and final.fds <= warm.fds + SLACK and rc == 0)
        return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--models-root", type=Path, help="folder with tiny-gpt2, tiny-mlp, tiny-bert (default: made)")
    p.add_argument("--warm-workers", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the JSON summary here too")
    args = p.parse_args(argv)
    summary = run(args.duration, args.models_root, args.warm_workers)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
