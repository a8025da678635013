"""The cold-start benchmark's pure logic: statistics over runs, the bound check, the targets,
the tables and the machine record. No process is spawned and nothing is measured here, so tests
can feed it runs and check what it concludes.

A run is valid when its process answered and its page-cache state was verified (``mincore``)
just before the clock started. Failed and invalid runs are kept in the JSON and counted in the
tables; medians are over valid runs only, and a cell whose runs were not all valid says so.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cicada_async.engine.procfs import kib_field, usable_cores

CLOCK = {
    "starts": "immediately before the strategy's function is called, in a fresh process, after: "
              "imports (torch, the model's transformers class, the engine's modules), reading the "
              "model spec (config and headers), making the example inputs, the CUDA context, and "
              "evicting (cold) or reading (warm) the weight files and checking that with mincore",
    "stops": "when the first forward's outputs are on the host (.cpu() returned; for cicada, "
             "when Engine.instance(...).infer() returned)",
    "inside": "model construction or skeleton, the engine's event loop and threads, every weight "
              "read, load_state_dict or placement, the forward",
    "outside": "teardown (engine shutdown, freeing the model and its mappings): measured as "
               "teardown_s, in no strategy's total",
    "bound": "cold: max(fastest cold read, warm forward, h2d) + skeleton; warm: warm forward + "
             "skeleton; measured in its own fresh process every repetition, interleaved with the "
             "strategies (see cicada_async/bench/bound.py)",
}


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs)}


def run_ok(r: dict[str, Any]) -> bool:
    return "error" not in r and not r.get("invalid")


def strategy_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the valid runs; every run, failed and invalid ones too, stays listed."""
    ok = [r for r in runs if run_ok(r)]
    out: dict[str, Any] = {
        "n": len(runs), "n_valid": len(ok),
        "n_failed": sum("error" in r for r in runs),
        "n_invalid": sum(bool(r.get("invalid")) and "error" not in r for r in runs),
        "runs": runs,
    }
    if not ok:
        return out
    times = [r["total_s"] for r in ok]
    out.update(_spread(times))
    out["runs_s"] = times
    out["peak_rss_bytes"] = int(statistics.median(r["peak_rss_bytes"] for r in ok))
    out["baseline_rss_bytes"] = int(statistics.median(r["baseline_rss_bytes"] for r in ok))
    # What a serverless platform bills for the cold start: the process's peak memory for as long.
    out["gb_s"] = statistics.median(r["peak_rss_bytes"] / 1e9 * r["total_s"] for r in ok)
    out["teardown_s"] = statistics.median(r.get("teardown_s", 0.0) for r in ok)
    keys = {k for r in ok for k in r.get("parts", {})}
    out["parts"] = {k: statistics.median(r["parts"][k] for r in ok if k in r["parts"]) for k in sorted(keys)}
    if any("plan_file_present" in r for r in ok):
        out["plan_file_present"] = sum(bool(r.get("plan_file_present")) for r in ok)
        out["dry_run"] = sum("dry-run_s" in r.get("parts", {}) for r in ok)
    return out


def bound_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"n": len(runs), "n_valid": len(ok), "n_failed": len(runs) - len(ok), "runs": runs}
    if not ok:
        return out
    out["cold"] = _spread([r["lower_bound_s"] for r in ok])
    out["warm"] = _spread([r["warm_bound_s"] for r in ok])
    for k in ("read_cold_s", "warm_forward_s", "skeleton_s", "h2d_s"):
        out[k] = statistics.median(r[k] for r in ok)
    methods = {m for r in ok for m in r["read_methods_s"]}
    out["read_methods_s"] = {m: _spread([r["read_methods_s"][m] for r in ok if m in r["read_methods_s"]])
                             for m in sorted(methods)}
    return out


def bound_violations(results: dict[str, Any]) -> list[str]:
    """One line per strategy whose median beats its bound's median, or per model without a
    bound: either means the measurement, not the strategy, is wrong."""
    lines = []
    for name, e in results["models"].items():
        b = e["bound"]
        if not b.get("n_valid"):
            lines.append(f"{name}: no valid bound run ({b['n_failed']} failed): nothing to check against")
            continue
        for variant in ("cold", "warm"):
            for s, st in e.get(variant, {}).items():
                if st.get("n_valid") and st["median_s"] < b[variant]["median_s"]:
                    lines.append(f"{name} {variant}: {s} median {st['median_s'] * 1e3:.0f} ms beats the "
                                 f"{variant} bound {b[variant]['median_s'] * 1e3:.0f} ms")
    return lines


def problem_runs(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, e in results["models"].items():
        for variant in ("cold", "warm"):
            for s, st in e.get(variant, {}).items():
                if st["n_valid"] < st["n"]:
                    reasons = [r.get("error") or r.get("invalid") for r in st["runs"] if not run_ok(r)]
                    lines.append(f"{name} {variant} {s}: {st['n_failed']} failed, {st['n_invalid']} invalid "
                                 f"of {st['n']}: {'; '.join(str(x)[:160] for x in reasons)}")
        b = e["bound"]
        if b["n_failed"]:
            lines.append(f"{name} bound: {b['n_failed']} of {b['n']} failed")
    return lines


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 10's targets per model: True, False, or None where a figure is missing."""
    out: dict[str, dict[str, Any]] = {}

    def med(e: dict[str, Any], variant: str, s: str) -> float | None:
        st = e.get(variant, {}).get(s)
        return st["median_s"] if st and st.get("n_valid") else None

    for name, e in results["models"].items():
        b = e["bound"]
        t: dict[str, Any] = {}
        for variant in ("cold", "warm"):
            c = med(e, variant, "cicada")
            for other in ("meta-mmap", "hf"):
                o = med(e, variant, other)
                t[f"{variant}: cicada <= {other}"] = None if c is None or o is None else c <= o
            if c is not None and b.get("n_valid"):
                ratio = c / b[variant]["median_s"]
                t[f"{variant}: cicada / bound"] = round(ratio, 3)
                t[f"{variant}: cicada <= {1.25 if variant == 'cold' else 1.1}x bound"] = (
                    ratio <= (1.25 if variant == "cold" else 1.1))
        c, eg = med(e, "cold", "cicada"), med(e, "cold", "eager")
        t["cold: eager / cicada"] = None if c is None or eg is None else round(eg / c, 2)
        t["cold: cicada >= 2x faster than eager"] = None if c is None or eg is None else eg / c >= 2
        out[name] = t
    return out


def _cell(st: dict[str, Any] | None, spread: bool = False) -> str:
    if not st:
        return "-"
    if not st.get("n_valid"):
        return f"failed ({st['n'] - st['n_valid']}/{st['n']})"
    s = f"{st['median_s'] * 1e3:.0f}"
    if spread:
        s += f" ({st['min_s'] * 1e3:.0f}-{st['max_s'] * 1e3:.0f})"
    if st["n_valid"] < st["n"]:
        s += f" [{st['n_valid']}/{st['n']} valid]"
    return s


def summary_table(results: dict[str, Any]) -> str:
    """Per model: cold and warm side by side, medians in ms, with the bounds' spread."""
    strategies = results["strategies"]
    head = ["model"] + [f"{s} cold" for s in strategies] + ["cold bound (min-max)", "cicada / bound"]
    head += [f"{s} warm" for s in strategies] + ["warm bound (min-max)", "cicada / warm bound", "eager / cicada"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in results["models"].items():
        b = e["bound"]
        row = [f"{name} ({e['weights_bytes'] / 1e6:.0f} MB)"]
        row += [_cell(e["cold"].get(s)) for s in strategies]
        row += [_cell(b.get("cold") and {**b["cold"], "n": b["n"], "n_valid": b["n_valid"]}, True)]
        c = e["cold"].get("cicada")
        ok = c and c.get("n_valid") and b.get("n_valid")
        row.append(f"{c['median_s'] / b['cold']['median_s']:.2f}" if ok else "-")
        row += [_cell(e.get("warm", {}).get(s)) for s in strategies]
        row += [_cell(b.get("warm") and {**b["warm"], "n": b["n"], "n_valid": b["n_valid"]}, True)] if "warm" in e else ["-"]
        w = e.get("warm", {}).get("cicada")
        row.append(f"{w['median_s'] / b['warm']['median_s']:.2f}" if w and w.get("n_valid") and b.get("n_valid") else "-")
        eg = e["cold"].get("eager")
        row.append(f"{eg['median_s'] / c['median_s']:.1f}x" if c and eg and c.get("n_valid") and eg.get("n_valid") else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail_table(results: dict[str, Any]) -> str:
    lines = ["| model | strategy | cache | median ms (min-max) | valid/runs | peak RSS MB (baseline) | GB-s | teardown ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in results["models"].items():
        for variant in ("cold", "warm"):
            for s, st in e.get(variant, {}).items():
                rss = (f"{st['peak_rss_bytes'] / 1e6:.0f} ({st['baseline_rss_bytes'] / 1e6:.0f})"
                       if st.get("n_valid") else "-")
                gbs = f"{st['gb_s']:.2f}" if st.get("n_valid") else "-"
                td = f"{st['teardown_s'] * 1e3:.0f}" if st.get("n_valid") else "-"
                lines.append(f"| {name} | {s} | {variant} | {_cell(st, True)} | {st['n_valid']}/{st['n']} | {rss} | {gbs} | {td} |")
        b = e["bound"]
        if b.get("n_valid"):
            reads = ", ".join(f"{m} {v['median_s'] * 1e3:.0f}" for m, v in b["read_methods_s"].items())
            lines.append(f"| {name} | bound | cold | {b['cold']['median_s'] * 1e3:.0f} ({b['cold']['min_s'] * 1e3:.0f}-"
                         f"{b['cold']['max_s'] * 1e3:.0f}) | {b['n_valid']}/{b['n']} | reads: {reads}; forward "
                         f"{b['warm_forward_s'] * 1e3:.0f}, skeleton {b['skeleton_s'] * 1e3:.0f} | | |")
    return "\n".join(lines)


REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total() -> int | None:
    return kib_field("/proc/meminfo", b"MemTotal:")


def provenance(argv: list[str]) -> dict[str, Any]:
    """Where the figures come from: the code, the machine, the command, the load around it."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(d: str) -> str | None:
        try:
            return version(d)
        except PackageNotFoundError:
            return None

    prog = "cicada" if Path(argv[0]).name in ("cicada", "__main__.py") else argv[0]
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
        "command": " ".join([prog, *argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"nproc": usable_cores(),
                    "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "memory_bytes": _mem_total(),
                    "kernel": platform.release(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": ver("torch"),
                    "transformers": ver("transformers"), "loadavg_start": list(os.getloadavg())},
        # Repository-relative (".venv/bin/python"): no machine's paths in committed JSON.
        "python_executable": _repo_relative(sys.executable),
        "clock": CLOCK,
    }


def script_provenance(script: str) -> dict[str, Any]:
    """``provenance`` for a measuring script (no cold-start clock). Take it before measuring,
    and ``finish_provenance`` after: the load average at both ends shows a quiet machine."""
    prov = provenance([script, *sys.argv[1:]])
    del prov["clock"]
    return prov


def finish_provenance(prov: dict[str, Any]) -> dict[str, Any]:
    """``prov`` with the load average at the end of the measurement."""
    prov["machine"]["loadavg_end"] = list(os.getloadavg())
    return prov


def _repo_relative(path: str) -> str:
    p = Path(path).absolute()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name
