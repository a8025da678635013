"""Run the locust load test headless against a server this script starts on 127.0.0.1.

  python loadtest/run_locust.py --out bench-results/loadtest [--model tiny-gpt2] [--users 16]
         [--duration 30] [--model-dir DIR]

Phases (each a bounded locust run):
  1. baseline   high-priority user alone (no load)
  2. saturated  the same high-priority user plus --users low-priority users with no pause
Writes each phase's CSV under --out and summary.md: RPS, p50/p95/p99 per priority, failures,
cold starts seen in /metrics, and the ratio of high-priority p99 under load to p99 alone.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cicada_async.bench.origins import free_port  # noqa: E402


def wait_ready(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not become ready")


def scrape(url: str) -> dict[str, float]:
    from cicada_async.service.metrics import parse_text

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return parse_text(r.read().decode())


def run_locust(url: str, out: Path, name: str, classes: list[str], users: int, duration: int, env: dict[str, str]) -> list[dict[str, str]]:
    prefix = out / name
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "--host", url, "-u", str(users), "-r", str(users), "-t", f"{duration}s", "--csv", str(prefix),
           "--only-summary", "--stop-timeout", "5", "--loglevel", "WARNING", *classes]
    subprocess.run(cmd, check=False, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(f"{prefix}_stats.csv", newline="") as f:
        return list(csv.DictReader(f))


def row(rows: list[dict[str, str]], name: str) -> dict[str, str] | None:
    return next((r for r in rows if r["Name"] == name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "loadtest")
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--model-dir", type=Path, help="model repository (default: make the zoo model in a temp dir)")
    ap.add_argument("--users", type=int, default=16, help="low-priority users in the saturated phase (max 64)")
    ap.add_argument("--duration", type=int, default=30, help="seconds per phase (max 300)")
    ap.add_argument("--seq", type=int, default=16)
    args = ap.parse_args()
    users, duration = min(args.users, 64), min(args.duration, 300)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = None
    repo = args.model_dir
    if repo is None:
        from cicada_async.models.catalogue import make_model

        tmp = Path(tempfile.mkdtemp(prefix="cicada-loadtest-"))
        make_model(args.model, tmp / args.model)
        repo = tmp
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CICADA_MODEL": args.model, "CICADA_SEQ": str(args.seq), "PYTHONPATH": str(ROOT)}
    log = open(args.out / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "cicada_async", "serve", "--model-repository", str(repo),
                               "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env, stderr=log)
    try:
        wait_ready(url)
        # Cold start first, timed on its own: the phases measure the warm server.
        t0 = time.monotonic()
        req = urllib.request.Request(f"{url}/v2/repository/models/{args.model}/load", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=600).close()
        cold_s = time.monotonic() - t0
        phases = {
            "baseline": run_locust(url, args.out, "baseline", ["HighPriorityUser"], 1, duration, env),
            "saturated": run_locust(url, args.out, "saturated", ["HighPriorityUser", "LowPriorityUser"],
                                    users + 1, duration, env),
        }
        metrics = scrape(url)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"# Load test: {args.model}, seq {args.seq}, {users} low-priority users, {duration} s per phase", "",
             "| phase | request | requests | failures | RPS | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for phase, rows in phases.items():
        for r in rows:
            lines.append(f"| {phase} | {r['Name']} | {r['Request Count']} | {r['Failure Count']} | "
                         f"{float(r['Requests/s']):.1f} | {r['50%']} | {r['95%']} | {r['99%']} |")
    base, sat = row(phases["baseline"], "infer p1"), row(phases["saturated"], "infer p1")
    lines.append("")
    if base and sat and float(base["99%"]) > 0:
        ratio = float(sat["99%"]) / float(base["99%"])
        lines.append(f"High-priority p99 under saturating low-priority load / p99 alone: **{ratio:.2f}x** "
                     f"({sat['99%']} ms vs {base['99%']} ms; target <= 2x).")
    cold = sum(v for k, v in metrics.items() if k.startswith("cicada_cold_starts_total"))
    shed = sum(v for k, v in metrics.items() if k.startswith("cicada_requests_shed_total"))
    lines.append(f"Cold starts seen in /metrics: {cold:.0f} (the warm-up load took {cold_s:.2f} s); "
                 f"requests shed: {shed:.0f}.")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
