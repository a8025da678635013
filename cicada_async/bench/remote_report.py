"""The remote benchmark's report: a markdown table and a bar chart of the results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any


PEERS = ["tensorizer", "runai", "download-then-load", "meta-mmap"]
SERVED = "cicada-served"  # remote_served.py: a running cicada serve's first answer


def _cell(st: dict[str, Any] | None) -> str:
    """Median with its run count; no median when any run failed (a survivor median hides it)."""
    if not st:
        return "-"
    if st.get("n_ok", 0) < st.get("n", 0) or "median_s" not in st:
        return f"FAILED {st.get('n_ok', 0)}/{st.get('n', 0)}"
    return f"{st['median_s']:.3f}"


def targets(cfg: dict[str, Any]) -> dict[str, float | None]:
    """cicada / best peer (target <= 0.8) and, shaped, cicada / (max(wire, fwd) + skeleton) (<= 1.2);
    the served path's first answer against the best peer and against the engine's own clock."""
    s = cfg["strategies"]
    ok = {k: v["median_s"] for k, v in s.items() if "median_s" in v and v.get("n_ok") == v.get("n")}
    cic = ok.get("cicada")
    peers = [ok[p] for p in PEERS if p in ok and not (cfg["storage"] != "local" and p == "meta-mmap")]
    best = min(peers) if peers else None
    served = ok.get(SERVED)
    return {"cicada_s": cic, "best_peer_s": best,
            "vs_best_peer": cic / best if cic and best else None,
            "vs_bound": cic / cfg["bound_s"] if cic and cfg.get("bound_s") else None,
            "served_s": served, "served_vs_best_peer": served / best if served and best else None,
            "served_vs_engine": served / cic if served and cic else None}


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"servers: {results['servers']}; medians of {results['repeat']} runs, each a fresh process; seconds",
        "",
        "| model | storage | rate MB/s | wire s | bound s | cicada | tensorizer | runai | download-then-load "
        "| meta-mmap | cicada / best peer | cicada / bound | cicada-served | served / best peer | served / engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["models"].items():
        for cfg in e["configs"].values():
            s, t = cfg["strategies"], targets(cfg)
            rate = "-" if cfg["cap_mbps"] is None else ("unshaped" if not cfg["cap_mbps"] else f"{cfg['cap_mbps']:g}")
            lines.append(
                f"| {name} | {cfg['storage']} | {rate} | {_f(cfg.get('wire_s'))} | {_f(cfg.get('bound_s'))} | "
                + " | ".join(_cell(s.get(k)) for k in ["cicada", *PEERS])
                + f" | {_f(t['vs_best_peer'], 2)} | {_f(t['vs_bound'], 2)} | {_cell(s.get(SERVED))}"
                + f" | {_f(t['served_vs_best_peer'], 2)} | {_f(t['served_vs_engine'], 2)} |")
        lines.append(f"\n{name}: warm forward {e['warm_forward_s']:.3f} s, skeleton {e['skeleton_s']:.3f} s; "
                     "bound = max(wire, warm forward) + skeleton")
    return "\n".join(lines)


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.8 * len(names)), squeeze=False)
    colors = {"cicada": "#ff7f0e", "download-then-load": "#1f77b4", "meta-mmap": "#2ca02c",
              "tensorizer": "#9467bd", "runai": "#8c564b", SERVED: "#d62728"}
    for ax, name in zip(axes[:, 0], names):
        e = results["models"][name]
        keys = list(e["configs"])
        strategies = ["cicada", SERVED, *PEERS]
        width = 0.14
        for j, s in enumerate(strategies):
            xs, ys, errs = [], [], []
            for i, k in enumerate(keys):
                st = e["configs"][k]["strategies"].get(s)
                if st and "median_s" in st:
                    xs.append(i + (j - 2) * width)
                    ys.append(st["median_s"])
                    errs.append([[st["median_s"] - st["min_s"]], [st["max_s"] - st["median_s"]]])
            if xs:
                yerr = [[a[0][0] for a in errs], [a[1][0] for a in errs]]
                ax.bar(xs, ys, width, yerr=yerr, label=s, color=colors[s], capsize=3)
        for i, k in enumerate(keys):
            b = e["configs"][k].get("bound_s")
            if b:
                ax.hlines(b, i - 2.5 * width, i + 2.5 * width, colors="k", linestyles="dashed",
                          label="max(wire, warm forward) + skeleton" if i == next(
                              n for n, kk in enumerate(keys) if e["configs"][kk].get("bound_s")) else None)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace("@", " @ ") + ("" if "@" not in k else " MB/s") for k in keys], fontsize=7)
        ax.set_ylabel("cold start (s), median")
        ax.set_title(f"{name}: cold start to first output ({e['weights_bytes'] / 1e6:.0f} MB weights)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
