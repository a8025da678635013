"""Medians, ratios, targets, the table and the timeline charts of ``cicada bench first-token``.

Per cell and peer, over its repetitions: the time to first token is the median of each run's
last first token (a burst's slowest request; a single request's only one), with the median
over every request beside it; peak RSS, GB-seconds per first token (peak RSS x the clock's
window / requests) and decode speed are medians too. Ratios are cicada's median over the best
peer's (the lowest median among transformers, llama.cpp, download-then-load and tensorizer),
over the bound, and cicada-spawn's over the import floor. A cicada median below its bound is a
bug in the benchmark or the bound, not a win: the cell says so and the run exits non-zero.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

PEERS = ("transformers", "llama.cpp", "download-then-load", "tensorizer")  # "the best peer" among these
GIB = 1 << 30


def _median(xs: list[Any]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def kv_bytes(config: dict[str, Any], tokens: int) -> int:
    """fp32 K and V of every layer for ``tokens`` positions."""
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return 2 * int(config["num_hidden_layers"]) * kv * head_dim * 4 * tokens


def peer_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"n_ok": len(ok), "n": len(runs), "errors": [r["error"] for r in runs if "error" in r]}
    if not ok:
        return out
    if ok[0]["peer"] == "floor":
        out.update({k: _median([r[k] for r in ok]) for k in ("spawn_to_first_s", "imports_s", "build_s", "prefill_s")})
    else:
        out["ttft_s"] = _median([r["ttft_last_s"] for r in ok])
        out["ttft_all_requests_s"] = _median([t for r in ok for t in r["ttft_s"]])
        out["ttft_runs_s"] = [r["ttft_last_s"] for r in ok]
        out["decode_tok_s"] = _median([d for r in ok for d in r["decode_tok_s"]])
        out["gb_seconds_per_first_token"] = _median([r["gb_seconds_per_first_token"] for r in ok])
        out["rss_at_send_bytes"] = _median([r.get("rss_at_send_bytes") for r in ok])
        out["prompt_tokens"] = sorted({p for r in ok for p in r["prompt_tokens"] if p is not None})
        logs = [r.get("cold_start_log") or {} for r in ok]
        if any(logs):  # the server's own cold start line: load start -> weights resident
            out["server_load_wall_s"] = _median([g.get("wall_s") for g in logs])
            out["server_time_to_first_compute_s"] = _median([(g.get("timeline") or {}).get("time_to_first_compute_s")
                                                              for g in logs])
        if "spawn_to_first_s" in ok[0]:
            out["spawn_to_first_s"] = _median([r["spawn_to_first_s"] for r in ok])
    out["rss_peak_bytes"] = _median([r["cost"]["rss_peak_bytes"] for r in ok])
    out["gb_seconds"] = _median([r["cost"]["gb_seconds"] for r in ok])
    out["gb_seconds_held"] = _median([r["cost"]["gb_seconds_held"] for r in ok])
    return out


def cell_summary(cell: dict[str, Any], runs: dict[str, list[dict[str, Any]]], bound: dict[str, Any] | None,
                 weights_bytes: int, config: dict[str, Any]) -> dict[str, Any]:
    peers = {p: peer_summary(rs) for p, rs in runs.items() if rs}
    best = min(((p, s["ttft_s"]) for p, s in peers.items() if p in PEERS and s.get("ttft_s") is not None),
               key=lambda x: x[1], default=(None, None))
    c = peers.get("cicada", {})
    spawn, floor = peers.get("cicada-spawn", {}), peers.get("floor", {})
    ttft = c.get("ttft_s")
    bound_s = bound["bound_s"] if bound else None
    kv = kv_bytes(config, cell["prompt_tokens"] + 1) * cell["burst"]
    ratios = {
        "cicada_over_best_peer": _ratio(ttft, best[1]),
        "cicada_over_bound": _ratio(ttft, bound_s),
        "cicada_spawn_over_floor": _ratio(spawn.get("spawn_to_first_s"), floor.get("spawn_to_first_s")),
        "cicada_peak_rss_over_weights_kv_baseline": _ratio(
            c.get("rss_peak_bytes"), weights_bytes + kv + (c.get("rss_at_send_bytes") or 0)),
    }
    limit_peer = 0.85 if cell["storage"] == "s3" else 0.75
    limit_bound = 1.25 if cell["burst"] > 1 else 1.2
    checks = {
        f"ttft <= {limit_peer}x best peer": None if ratios["cicada_over_best_peer"] is None
        else ratios["cicada_over_best_peer"] <= limit_peer,
        f"ttft <= {limit_bound}x bound": None if ratios["cicada_over_bound"] is None or cell["storage"] == "s3"
        else ratios["cicada_over_bound"] <= limit_bound,
        "spawn <= 1.15x import floor": None if ratios["cicada_spawn_over_floor"] is None
        else ratios["cicada_spawn_over_floor"] <= 1.15,
        "peak RSS <= 1.1x weights + KV + baseline": None if ratios["cicada_peak_rss_over_weights_kv_baseline"] is None
        else ratios["cicada_peak_rss_over_weights_kv_baseline"] <= 1.1,
    }
    below = bool(ttft is not None and bound_s is not None and ttft < bound_s)
    return {**cell, "bound": bound, "best_peer": best[0], "peers": peers, "ratios": ratios, "targets": checks,
            "weights_bytes": weights_bytes, "kv_cache_bytes": kv, "below_bound": below}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def format_table(cells: list[dict[str, Any]]) -> str:
    head = (f"{'cell':34s} {'peer':19s} {'ttft ms':>9s} {'all req':>8s} {'spawn':>8s} {'peak GiB':>8s} "
            f"{'GB-s/tok':>8s} {'tok/s':>6s}  n")
    lines = [head, "-" * len(head)]
    for c in cells:
        key = c["key"]
        for peer, s in c["peers"].items():
            rss = s.get("rss_peak_bytes")
            lines.append(f"{key:34s} {peer:19s} {_ms(s.get('ttft_s')):>9s} {_ms(s.get('ttft_all_requests_s')):>8s} "
                         f"{_ms(s.get('spawn_to_first_s')):>8s} {(rss or 0) / GIB:8.2f} "
                         f"{s.get('gb_seconds_per_first_token') or 0:8.2f} {s.get('decode_tok_s') or 0:6.1f}  "
                         f"{s['n_ok']}/{s['n']}" + (f"  ERR {s['errors'][0][:60]}" if s["errors"] else ""))
            key = ""
        b = c.get("bound") or {}
        r = c["ratios"]
        lines.append(f"{'':34s} bound {_ms(b.get('bound_s'))} ms (skeleton {_ms(b.get('skeleton_s'))} + max(read "
                     f"{_ms(b.get('read_s'))}, prefill {_ms(b.get('prefill_s'))}) + decode {_ms(b.get('decode_step_s'))})"
                     f"; cicada/best peer ({c['best_peer']}) {r['cicada_over_best_peer']}, /bound {r['cicada_over_bound']}, "
                     f"spawn/floor {r['cicada_spawn_over_floor']}" + ("  BELOW THE BOUND" if c["below_bound"] else ""))
    return "\n".join(lines)


def plot_timelines(timelines_json: Path, png: Path, title: str) -> None:
    """The last cold start's timeline that ``cicada serve`` kept (``--plot``), as a Gantt chart."""
    from cicada_async.engine.timeline import Span, Timeline

    docs = json.loads(timelines_json.read_text())
    if not docs:
        raise RuntimeError("the server kept no timeline")
    tl = Timeline(t0=0.0, spans=[Span(**s) for s in docs[-1]["spans"]])
    tl.plot(png, title=title)
