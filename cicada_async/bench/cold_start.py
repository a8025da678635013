"""``cicada bench cold-start``: every strategy side by side, each run a fresh process.

What a skeptic can check (docs/benchmarks-local.md says more):
- Every run is a fresh process; imports, the model spec and the inputs are done before the
  clock; the clock stops when the first forward's outputs are on the host; teardown is outside
  every strategy's clock (``cold_start_report.CLOCK`` is written into the JSON).
- Before each cold run the worker evicts the weight files and checks with ``mincore`` that no
  page is left; before each warm run it reads them and checks that all are resident. A run
  whose state could not be made is kept, marked invalid and counted, never used in a median.
- The lower bound (``bound.py``) is measured in its own process every repetition, interleaved
  with the strategies in an order rotated per repetition, and reported with its spread.
- Failed runs are counted and shown. The command exits 1, with a line saying why, when any
  strategy's median beats its bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cicada_async.bench.bound import bound_worker, loaded
from cicada_async.bench.cold_start_report import (
    bound_stats, bound_violations, detail_table, problem_runs, provenance, strategy_stats, summary_table, targets,
)
from cicada_async.bench.pagecache import drop_page_cache, make_cold, make_warm, read_all, weight_files

__all__ = ["drop_page_cache", "run_bench", "cold_start_bench", "worker", "bound_worker"]

BENCH_SEQ = 128
WORKER_TIMEOUT_S = 900.0
# measure(argv) runs one worker (a strategy, or the bound) and returns its JSON, or {"error"}.
Measure = Callable[[list[str]], dict[str, Any]]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _plan_files(model_dir: Path) -> int:
    return len(list((model_dir / ".cicada").glob("plan-*.json")))


def worker(strategy: str, model_dir: Path, variant: str = "cold", device: str = "cpu") -> dict[str, Any]:
    """One inference from a cold (or warm) page cache in this fresh process."""
    import torch  # noqa: F401

    from cicada_async.bench.strategies import RUNNERS, example_inputs, local_spec
    from cicada_async.engine.modeldir import prepare_imports

    spec = local_spec(model_dir)
    prepare_imports(spec)
    if strategy == "cicada":
        import cicada_async.engine.pipeline
        import cicada_async.engine.runtime  # noqa: F401
    inputs = example_inputs(spec, seq=BENCH_SEQ)
    if device != "cpu":
        torch.zeros(1, device=device)  # CUDA context creation is not part of any strategy
    # Last thing before the clock: reading the spec above touched the header pages.
    state = make_cold(model_dir) if variant == "cold" else make_warm(model_dir)
    invalid = None
    if variant == "cold" and state.resident_bytes:
        invalid = f"not evicted: {state.resident_bytes} of {state.total_bytes} bytes resident after 3 drops"
    elif variant == "warm" and state.resident_bytes < state.total_bytes:
        invalid = f"not warm: {state.resident_bytes} of {state.total_bytes} bytes resident"
    elif not state.trusted:
        invalid = "mincore cannot see these files' page cache (not owned, not writable)"
    plan_present = _plan_files(model_dir) > 0
    baseline = _rss_bytes()
    t0 = time.perf_counter()
    _, parts = RUNNERS[strategy](model_dir, spec, inputs, None, device)
    returned = time.perf_counter()  # the baselines' models are freed by now; the engine is shut
    total = parts.pop("outputs_at") - t0
    parts.pop("total_s", None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"total_s": total, "teardown_s": returned - t0 - total, "parts": parts, "peak_rss_bytes": peak,
           "baseline_rss_bytes": baseline, "residency": state.as_dict(), "invalid": invalid}
    if strategy == "cicada":
        out["plan_file_present"] = plan_present
    return out


def spawn(argv: list[str]) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; a failure is returned as {"error"}, not raised."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "cicada_async.bench.cold_start", *argv],
                              capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result
    except (IndexError, json.JSONDecodeError):
        return {"error": f"no result line in the worker's output: {proc.stdout[-200:]!r}"}


def _rotated(xs: list[str], k: int) -> list[str]:
    k %= len(xs)
    return xs[k:] + xs[:k]


def run_bench(model_dirs: dict[str, Path], strategies: list[str], repeat: int, warm: bool,
              device: str = "cpu", measure: Measure = spawn, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every repetition: the bound and each strategy cold, in an order rotated per rep, then each
    strategy warm. Returns the results (runs, stats, bound) keyed by model."""
    dev = [device] if device != "cpu" else []
    variants = ["cold"] + (["warm"] if warm else [])
    results: dict[str, Any] = {"repeat": repeat, "strategies": strategies, "variants": variants,
                               "device": device, "models": {}}
    for name, d in model_dirs.items():
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        bound_runs: list[dict[str, Any]] = []
        usable = [s for s in strategies if s != "hf" or (d / "config.json").exists()]
        # Read once before any clock: the first read of freshly made weight files ran 5-20x
        # slower (bert-base cold 11.3 s once against 0.5-0.7), and rep 1 starts with cicada.
        read_all(weight_files(d))
        for rep in range(repeat):
            for variant in variants:
                slots = usable + (["bound"] if variant == "cold" else [])
                for s in _rotated(slots, rep):
                    load = os.getloadavg()[0]
                    if s == "bound":
                        r = measure(["--bound", str(d), *dev])
                        bound_runs.append({**r, "rep": rep, "loadavg_1m": load})
                        shown = (f"{r['lower_bound_s'] * 1e3:.0f} ms (warm {r['warm_bound_s'] * 1e3:.0f}, read "
                                 f"{r['read_cold_s'] * 1e3:.0f} {r['read_method']})") if "error" not in r else ""
                    else:
                        r = measure(["--worker", s, str(d), variant, *dev])
                        runs.setdefault((variant, s), []).append({**r, "rep": rep, "loadavg_1m": load})
                        shown = f"{r['total_s'] * 1e3:.0f} ms" if "error" not in r else ""
                        if r.get("invalid"):
                            shown += f" INVALID ({r['invalid']})"
                    if "error" in r:
                        shown = f"FAILED: {r['error'][:200]}"
                    log(f"  {name:12s} {variant} {s:10s} rep {rep + 1}: {shown}")
        entry: dict[str, Any] = {"dir": str(d), "weights_bytes": sum(f.stat().st_size for f in weight_files(d)),
                                 "bound": bound_stats(bound_runs)}
        for variant in variants:
            entry[variant] = {s: strategy_stats(runs.get((variant, s), [])) for s in usable}
        results["models"][name] = entry
    return results


def cold_start_bench(args: argparse.Namespace, measure: Measure = spawn) -> int:
    from cicada_async.models.catalogue import make_model

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    record = provenance(sys.argv)
    for name in models:
        d = args.dir / name
        if not weight_files(d):
            print(f"making {name} in {d} ...", flush=True)
            make_model(name, d)
    t0 = time.time()
    results = run_bench({m: args.dir / m for m in models}, strategies, args.repeat, args.warm,
                        getattr(args, "device", "cpu"), measure, lambda line: print(line, flush=True))
    record["machine"]["loadavg_end"] = list(os.getloadavg())
    record["wall_s"] = time.time() - t0
    results = {**record, **results}
    results["targets"] = targets(results)
    violations = bound_violations(results)
    problems = problem_runs(results)
    results["bound_violations"] = violations
    results["problem_runs"] = problems
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(summary_table(results))
    print()
    print(detail_table(results))
    print(f"\nJSON: {args.json}")
    for line in problems:
        print(f"NOT COUNTED: {line}", flush=True)
    if violations:
        for line in violations:
            print(f"BOUND BEATEN: {line}", file=sys.stderr, flush=True)
        print("FAILED: a median below its lower bound means the bound or the eviction is wrong; "
              "these figures must not be quoted", file=sys.stderr, flush=True)
        return 1
    return 0


def warm_forward_bench(args: argparse.Namespace) -> int:
    """Warm forwards of a model loaded by the pipeline vs the same weights loaded the stock way,
    alternating in one process: what the gates cost once the model is warm."""
    import asyncio

    import torch

    from cicada_async.bench.strategies import example_inputs, local_spec
    from cicada_async.engine.forward import output_dict
    from cicada_async.engine.modeldir import prepare_imports
    from cicada_async.engine.runtime import Engine

    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        d = args.dir / name
        spec = local_spec(d)
        prepare_imports(spec)
        inputs = example_inputs(spec, seq=BENCH_SEQ)

        async def load() -> torch.nn.Module:
            async with Engine(warm_imports=False) as engine:
                inst = engine.instance(name, str(d))
                await inst.infer(inputs)
                assert inst._model is not None
                return inst._model

        ours = asyncio.run(load())
        stock = loaded(d, spec)
        times: dict[str, list[float]] = {"cicada": [], "meta-mmap": []}
        with torch.inference_mode():
            for m in (ours, stock):  # first touches out of the way
                output_dict(m(**inputs))
            for _ in range(args.repeat):
                for label, m in (("cicada", ours), ("meta-mmap", stock)):
                    t0 = time.perf_counter()
                    output_dict(m(**inputs))
                    times[label].append(time.perf_counter() - t0)
        a, b = statistics.median(times["cicada"]), statistics.median(times["meta-mmap"])
        print(f"{name:12s} warm forward: cicada-loaded {a * 1e3:7.1f} ms, stock-loaded {b * 1e3:7.1f} ms, "
              f"ratio {a / b:.3f} (median of {args.repeat}, alternating)", flush=True)
    return 0


def _main(argv: list[str]) -> int:
    if argv[0] == "--worker":
        print(json.dumps(worker(argv[1], Path(argv[2]), *argv[3:5])))
    elif argv[0] == "--bound":
        print(json.dumps(bound_worker(Path(argv[1]), argv[2] if len(argv) > 2 else "cpu", seq=BENCH_SEQ)))
    else:
        raise SystemExit("usage: python -m cicada_async.bench.cold_start --worker STRATEGY DIR [cold|warm] [DEVICE]"
                         " | --bound DIR [DEVICE]")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
