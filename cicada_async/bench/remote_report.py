"""The remote benchmark's report: a markdown table and a bar chart of the results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"servers: {results['servers']}; medians of {results['repeat']} runs, each a fresh process",
        "",
        "| model | storage | cap MB/s | wire s | warm fwd s | cicada s | x max(wire, fwd) | download-then-load s | speedup | local meta-mmap s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["models"].items():
        for key, cfg in e["configs"].items():
            s = cfg["strategies"]
            cic = s.get("cicada", {}).get("median_s")
            if cfg["cap_mbps"] is None:
                mm = s.get("meta-mmap", {}).get("median_s")
                lines.append(f"| {name} | local (cold cache) | - | - | {e['warm_forward_s']:.3f} | "
                             f"{_f(cic)} | - | - | - | {_f(mm)} |")
                continue
            dtl = s.get("download-then-load", {}).get("median_s")
            lines.append(
                f"| {name} | {cfg['storage']} | {cfg['cap_mbps']:g} | {cfg['wire_s']:.3f} | {e['warm_forward_s']:.3f} | "
                f"{_f(cic)} | {_f(cic / cfg['bound_s'] if cic else None, 2)} | {_f(dtl)} | "
                f"{_f(dtl / cic if cic and dtl else None, 2)}x | - |"
            )
    fetch_rows = [(n, e["fetch"]) for n, e in results["models"].items() if "fetch" in e]
    if fetch_rows:
        lines += ["", f"Fetch into memory from {results['servers'].get('s3')} (uncapped), GB/s (median):", "",
                  "| model | bytes | cicada S3 backend | Run:ai Model Streamer | ratio |", "|---|---|---|---|---|"]
        for n, f in fetch_rows:
            a = f.get("cicada-s3", {}).get("median_gbps")
            b = f.get("runai", {}).get("median_gbps")
            nbytes = f.get("cicada-s3", {}).get("bytes") or 0
            lines.append(f"| {n} | {nbytes / 1e6:.0f} MB | {_f(a)} | {_f(b)} | {_f(a / b if a and b else None, 2)} |")
    return "\n".join(lines)


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.8 * len(names)), squeeze=False)
    colors = {"cicada": "#ff7f0e", "download-then-load": "#1f77b4", "meta-mmap": "#2ca02c"}
    for ax, name in zip(axes[:, 0], names):
        e = results["models"][name]
        keys = list(e["configs"])
        strategies = ["cicada", "download-then-load", "meta-mmap"]
        width = 0.27
        for j, s in enumerate(strategies):
            xs, ys, errs = [], [], []
            for i, k in enumerate(keys):
                st = e["configs"][k]["strategies"].get(s)
                if st and "median_s" in st:
                    xs.append(i + (j - 1) * width)
                    ys.append(st["median_s"])
                    errs.append([[st["median_s"] - st["min_s"]], [st["max_s"] - st["median_s"]]])
            if xs:
                yerr = [[a[0][0] for a in errs], [a[1][0] for a in errs]]
                ax.bar(xs, ys, width, yerr=yerr, label=s, color=colors[s], capsize=3)
        for i, k in enumerate(keys):
            b = e["configs"][k].get("bound_s")
            if b:
                ax.hlines(b, i - 1.5 * width, i + 1.5 * width, colors="k", linestyles="dashed",
                          label="max(wire, warm forward)" if i == next(
                              n for n, kk in enumerate(keys) if e["configs"][kk].get("bound_s")) else None)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace("@", " @ ") + ("" if "@" not in k else " MB/s") for k in keys])
        ax.set_ylabel("cold start (s), median")
        ax.set_title(f"{name}: cold start to first output ({e['weights_bytes'] / 1e6:.0f} MB weights)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
