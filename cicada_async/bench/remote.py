"""``cicada bench cold-start --storage local,http,s3``: cold starts from remote storage.

The origins (``origins.py``: nginx or aiohttp static; rclone's serve s3, s3rver or moto) run in a network namespace
behind a veth pair (``netns.ShapedLink``); ``--bandwidth-mbps`` lists the link rates in MB/s,
shaped by the kernel's tc (0 = unshaped). Everything is stopped and deleted when done.

Per model and storage/rate, interleaved, each a fresh process (``peers.py``: the strategies,
the common clock, imports before it): ``cicada``, ``tensorizer`` (HTTP, S3: its own format from
the same origin), ``runai`` (local, S3), ``download-then-load`` (streamed to disk as it lands,
then ``meta-mmap``), and from local disk ``cicada`` and ``meta-mmap``. Before every run the
model's local pages, the origin's files and the S3 server's data directory are dropped from the page
cache.

Reference figures: wire time (bytes / rate) and the warm forward and skeleton
(``cold_start.bound_worker``): the shaped-rate target is max(wire, warm forward) + skeleton.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cicada_async.bench.origins import BUCKET, S3_DATA, model_files, start_http_origin, start_s3, upload_s3
from cicada_async.bench.peers import TENSORS
from cicada_async.bench.remote_served import STRATEGY as SERVED
from cicada_async.bench.remote_served import served_run
from cicada_async.bench.remote_report import format_table, plot

BENCH_SEQ = 128
WORKER_TIMEOUT_S = 600
MB = 1_000_000
LOCAL_STRATEGIES = ["cicada", "meta-mmap", "runai"]
# cicada-served: a running ``cicada serve``'s first answer over HTTP (remote_served.py), the
# path a user meets, beside the engine's own clock (``cicada``).
REMOTE_STRATEGIES = {"http": ["cicada", "cicada-served", "tensorizer", "download-then-load"],
                     "s3": ["cicada", "cicada-served", "tensorizer", "runai", "download-then-load"]}


# ------------------------------------------------------------------------ workers (fresh processes)


def _remote_settings(kind: str, endpoint: str | None, creds: dict[str, str]) -> dict[str, Any]:
    if kind == "s3":
        return {"endpoint_url": endpoint, "region": "us-east-1", "addressing_style": "path", **creds}
    return {}


def _spawn(argv: list[str], timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "cicada_async.bench.remote", *argv],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _spawn_bound(model_dir: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "cicada_async.bench.cold_start", "--bound", str(model_dir)],
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"bound worker failed: {proc.stderr.strip()[-300:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------------ driver


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def _cells(storages: list[str], rates: list[float]) -> list[tuple[str, float | None, str]]:
    """Every (storage, rate MB/s, strategy) of a model; rate 0 is the unshaped link."""
    cells: list[tuple[str, float | None, str]] = []
    if "local" in storages:
        cells += [("local", None, s) for s in LOCAL_STRATEGIES]
    for kind in (s for s in storages if s in REMOTE_STRATEGIES):
        cells += [(kind, rate, s) for rate in rates for s in REMOTE_STRATEGIES[kind]]
    return cells


def _origin_dir(origin: Path, name: str, d: Path) -> Path:
    """The model as the origins serve it: links to its files plus ``model.tensors``, the same
    weights in tensorizer's format (serialized once, outside every clock)."""
    out = origin / name
    out.mkdir(parents=True)
    for f in model_files(d):
        (out / f.name).symlink_to(f.resolve())
    try:
        from safetensors.torch import load_file
        from tensorizer import TensorSerializer
    except ImportError as e:
        print(f"warning: tensorizer unavailable ({e}); its runs will fail", flush=True)
        return out
    ser = TensorSerializer(str(out / TENSORS))
    for f in sorted(d.glob("*.safetensors")):
        ser.write_state_dict(load_file(str(f)))
    ser.close()
    return out


def _save(path: Path, results: dict[str, Any]) -> None:
    from cicada_async.bench.remote_report import targets

    for e in results["models"].values():
        for cfg in e["configs"].values():
            cfg["targets"] = targets(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def _summarize(entry: dict[str, Any], runs: dict[tuple[str, float | None, str], list[dict[str, Any]]]) -> None:
    """Medians per (storage, rate, strategy) into ``entry["configs"]``; failures counted, kept."""
    all_bytes = entry["files_bytes"]
    for (kind, cap, strategy), rs in runs.items():
        if not rs:  # a rate not run yet (the JSON is saved after every rate)
            continue
        ok = [r for r in rs if "total_s" in r]
        key = kind if cap is None else f"{kind}@{cap:g}"
        cfg = entry["configs"].setdefault(key, {"storage": kind, "cap_mbps": cap, "strategies": {}})
        if cap:
            cfg["wire_s"] = all_bytes / (cap * MB)
            cfg["bound_s"] = max(cfg["wire_s"], entry["warm_forward_s"]) + entry["skeleton_s"]
        st: dict[str, Any] = {"n_ok": len(ok), "n": len(rs), "errors": [r["error"] for r in rs if "error" in r]}
        if ok:
            st.update(_stats([r["total_s"] for r in ok]))
            st["parts"] = {k: statistics.median(r["parts"][k] for r in ok if k in r["parts"])
                           for k in ok[0].get("parts", {})
                           if isinstance(ok[0]["parts"][k], (int, float)) and k != "outputs_at"}
            if "summary" in ok[0]:
                st["timeline"] = {k: statistics.median(r["summary"][k] for r in ok if k in r["summary"])
                                  for k in ok[0]["summary"]}
        cfg["strategies"][strategy] = st


def remote_cold_start_bench(args: argparse.Namespace) -> int:
    from cicada_async.bench.cold_start import drop_page_cache
    from cicada_async.bench.netns import ShapedLink, available, drop_tree
    from cicada_async.models.catalogue import make_model

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    unknown = set(storages) - {"local", "http", "s3"}
    if unknown:
        raise SystemExit(f"--storage: unknown {sorted(unknown)} (local, http, s3)")
    rates = [float(c) for c in str(args.bandwidth_mbps).split(",") if c.strip()]
    remote_kinds = [s for s in storages if s in ("http", "s3")]
    why = available()
    if remote_kinds and why:
        raise SystemExit(f"remote storage needs a kernel-shaped link: {why}")
    root = Path(args.dir)
    dirs: dict[str, Path] = {}
    for name in models:
        d = root / name
        if not list(d.glob("*.safetensors")):
            print(f"making {name} in {d} ...", flush=True)
            make_model(name, d)
        dirs[name] = d
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {
        "command": " ".join(["cicada bench cold-start", *sys.argv[3:]]) if sys.argv[1:2] == ["bench"]
        else " ".join(sys.argv), "commit": commit,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "repeat": args.repeat, "rates_mbps": rates, "storages": storages, "servers": {}, "models": {},
        "link": "origin in a network namespace behind a veth pair; tc tbf on its egress at each rate "
                "(0 = no qdisc, unshaped); origin files and the S3 server's data dropped from the page cache "
                "(fsync + posix_fadvise DONTNEED) before every run",
        "engine_settings": "cicada serve's defaults: Engine(every_core_when_idle=True), torch threads = usable cores - 1 while fetching; backend defaults",
        "clock": "load start to the first forward's outputs on the host; teardown outside",
    }
    # SIGTERM (a timeout, kill) unwinds like Ctrl-C: the servers stop and the namespace goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="cicada-bench-remote-") as tmpd:
        tmp = Path(tmpd)
        os.chmod(tmp, 0o755)
        link = stack.enter_context(ShapedLink()) if remote_kinds else None
        origin = tmp / "origin"
        served = {name: _origin_dir(origin, name, d) for name, d in dirs.items()} if remote_kinds else {}
        endpoints: dict[str, str] = {}
        creds: dict[str, str] = {}
        if "http" in remote_kinds:
            (tmp / "nginx").mkdir()
            endpoints["http"], results["servers"]["http"] = start_http_origin(origin, tmp / "nginx", stack, link)
        if "s3" in remote_kinds:
            endpoints["s3"], results["servers"]["s3"], creds = start_s3(tmp, stack, link)
            print(f"uploading {', '.join(models)} to {results['servers']['s3']} ...", flush=True)
            upload_s3(endpoints["s3"], creds, served)
        print(f"servers: {results['servers']}; link: {link.ns if link else None}", flush=True)

        for name, d in dirs.items():
            all_bytes = sum(f.stat().st_size for f in model_files(d))
            bound = _spawn_bound(d)
            entry: dict[str, Any] = {"weights_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")),
                                     "files_bytes": all_bytes, "warm_forward_s": bound["warm_forward_s"],
                                     "skeleton_s": bound["skeleton_s"], "read_cold_s": bound["read_cold_s"],
                                     "configs": {}}
            cells = _cells(storages, rates)
            runs: dict[tuple[str, float | None, str], list[dict[str, Any]]] = {c: [] for c in cells}
            # Rate by rate (changing tc between cells would not change a link mid-run), the
            # strategies interleaved within it and their order rotated each rep.
            groups: dict[float | None, list[tuple[str, float | None, str]]] = {}
            for c in cells:
                groups.setdefault(c[1], []).append(c)
            for rate, group in groups.items():
                if link is not None and rate is not None:
                    link.set_rate(rate * MB * 8 if rate else None)
                for rep in range(args.repeat):
                    for kind, cap, strategy in group[rep % len(group):] + group[: rep % len(group)]:
                        def evict(d: Path = d, kind: str = kind) -> None:
                            drop_page_cache(d)
                            if kind != "local":
                                drop_tree(origin)
                                if kind == "s3":
                                    drop_tree(tmp / S3_DATA)

                        evict()
                        if kind == "local":
                            uri, storage = str(d), {}
                        else:
                            uri = f"s3://{BUCKET}/{name}" if kind == "s3" else f"{endpoints['http']}/{name}/"
                            storage = {kind: _remote_settings(kind, endpoints.get(kind), creds)}
                        if strategy == SERVED:
                            r = served_run(uri, storage, d, evict, BENCH_SEQ)
                        else:
                            r = _spawn(["--worker", strategy, uri, str(d), json.dumps(storage)])
                        runs[(kind, cap, strategy)].append(r)
                        label = kind if cap is None else f"{kind} @{cap:g} MB/s" if cap else f"{kind} unshaped"
                        shown = f"{r['total_s'] * 1e3:8.0f} ms" if "total_s" in r else f"FAILED: {r['error']}"
                        print(f"  {name:10s} {label:18s} {strategy:18s} rep {rep + 1}: {shown}", flush=True)
                # Saved after every rate, so a run cut short keeps what it measured.
                _summarize(entry, runs)
                results["models"][name] = entry
                _save(args.json, results)
            results["models"][name] = entry
    # every server is stopped and the namespace deleted here
    _save(args.json, results)
    png = args.json.with_suffix(".png")
    try:
        plot(results, png)
    except Exception as e:  # noqa: BLE001 - a missing plot must not lose the figures
        print(f"warning: no chart: {e}", file=sys.stderr)
        png = None
    print(format_table(results))
    print(f"\nJSON: {args.json}" + (f"\nchart: {png}" if png else ""))
    return 0


def _main(argv: list[str]) -> int:
    if argv[0] == "--worker":
        from cicada_async.bench.peers import worker

        print(json.dumps(worker(argv[1], argv[2], Path(argv[3]), json.loads(argv[4]))))
    else:
        raise SystemExit("usage: python -m cicada_async.bench.remote --worker STRATEGY URI LOCAL_DIR STORAGE_JSON")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
