"""``cicada bench cold-start``: every strategy side by side, each run a fresh process.

Runs are interleaved (rep 1 of every strategy, then rep 2, ...) so that drift of a shared
machine hits all strategies alike. Cold runs drop the model's pages from the page cache first
(``posix_fadvise(DONTNEED)``, no root needed). The lower bound is measured in the same run:
max(plain sequential read of the weight files from a cold cache, warm forward) + skeleton time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_SEQ = 128


def _device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def drop_page_cache(path: Path) -> None:
    """Evict every file under ``path`` from the page cache (works without root)."""
    os.sync()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(model_dir: Path) -> None:
    for f in _weights(model_dir):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _weights(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def worker(strategy: str, model_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """One cold inference in this (fresh) process; imports are done before the clock starts."""
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
    baseline = _rss_bytes()
    t0 = time.perf_counter()
    _, parts = RUNNERS[strategy](model_dir, spec, inputs, None, device)
    # Request to outputs; a strategy that tears down an engine afterwards reports its own total.
    total = parts.get("total_s", time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"total_s": total, "parts": parts, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline}


def bound_worker(model_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """The parts of the physical lower bound, measured in one process."""
    import torch

    from cicada_async.bench.strategies import example_inputs, local_spec
    from cicada_async.engine.modeldir import prepare_imports
    from cicada_async.engine.skeleton import skeleton_mode

    spec = local_spec(model_dir)
    prepare_imports(spec)
    skeleton = []
    for _ in range(3):
        t0 = time.perf_counter()
        with skeleton_mode():
            spec.build()
        skeleton.append(time.perf_counter() - t0)
    read_cold, read_methods = _plain_read(model_dir)
    inputs = example_inputs(spec, seq=BENCH_SEQ)
    from cicada_async.engine.forward import output_dict

    model = _loaded(model_dir, spec, inputs).to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    fwd = []
    with torch.inference_mode():
        for _ in range(4):
            t0 = time.perf_counter()
            out = output_dict(model(**inputs))
            {k: v.cpu() for k, v in out.items()}
            fwd.append(time.perf_counter() - t0)
    warm_forward = statistics.median(fwd[1:])
    sk = statistics.median(skeleton)
    h2d = 0.0
    if device != "cpu":
        # Host-to-device time of all weight bytes from pinned memory, in 64 MiB pieces.
        total = sum(f.stat().st_size for f in _weights(model_dir))
        src = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(total, dtype=torch.uint8, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for lo in range(0, total, src.numel()):
            n = min(src.numel(), total - lo)
            dst[lo : lo + n].copy_(src[:n], non_blocking=True)
        torch.cuda.synchronize()
        h2d = time.perf_counter() - t0
    return {
        "skeleton_s": sk,
        "read_cold_s": read_cold,
        "read_methods_s": read_methods,
        "warm_forward_s": warm_forward,
        "h2d_s": h2d,
        "lower_bound_s": max(read_cold, warm_forward, h2d) + sk,
    }


def _plain_read(model_dir: Path) -> tuple[float, dict[str, float]]:
    """A cold sequential read of the weight files, 16 MiB at a time into one reused buffer,
    through the page cache and with O_DIRECT; the faster of the two is the disk's time."""
    import mmap

    out: dict[str, float] = {}
    buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    for method, flags in (("buffered", 0), ("direct", getattr(os, "O_DIRECT", 0))):
        if method == "direct" and not flags:
            continue
        drop_page_cache(model_dir)
        t0 = time.perf_counter()
        for f in _weights(model_dir):
            fd = os.open(f, os.O_RDONLY | flags)
            try:
                off = 0
                while n := os.preadv(fd, [view], off):
                    off += n
                    if n < len(view):
                        break
            finally:
                os.close(fd)
        out[method] = time.perf_counter() - t0
    return min(out.values()), out


def _loaded(model_dir: Path, spec: Any, inputs: Any) -> Any:
    """A model loaded the meta-mmap way (that strategy returns outputs only), to time forwards."""
    from cicada_async.bench.strategies import _state_dict, _tie_groups
    from cicada_async.engine.skeleton import skeleton_mode

    with skeleton_mode():
        model = spec.build()
    ties = _tie_groups(model)
    model.load_state_dict(_state_dict(model_dir, spec, model), strict=False, assign=True)
    for group in ties:
        p = next(m._parameters[n] for m, n in group if not m._parameters[n].is_meta)
        for m, n in group:
            m._parameters[n] = p
    return model.eval()


def _spawn(args: list[str], device: str = "cpu") -> dict[str, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "cicada_async.bench.cold_start", *args, *([device] if device != "cpu" else [])],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"bench worker {args} failed: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cold_start_bench(args: argparse.Namespace) -> int:
    from cicada_async.models.catalogue import make_model

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "device": _device_name(getattr(args, "device", "cpu"))},
        "repeat": args.repeat,
        "models": {},
    }
    for name in models:
        d = args.dir / name
        if not _weights(d):
            print(f"making {name} in {d} ...", flush=True)
            make_model(name, d)
    variants = [("cold", True)] + ([("warm", False)] if args.warm else [])
    for name in models:
        d = args.dir / name
        weights = sum(f.stat().st_size for f in _weights(d))
        entry: dict[str, Any] = {"weights_bytes": weights, "strategies": {}}
        device = getattr(args, "device", "cpu")
        bound = _spawn(["--bound", str(d)], device)
        entry.update(bound)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rep in range(args.repeat):
            # Rotate the order each rep so no strategy always runs right after another.
            order = strategies[rep % len(strategies):] + strategies[: rep % len(strategies)]
            for variant, cold in variants:
                for s in order:
                    if s == "hf" and not (d / "config.json").exists():
                        continue
                    if cold:
                        drop_page_cache(d)
                    else:
                        _read_all(d)  # warm: every weight page in the page cache
                    r = _spawn(["--worker", s, str(d)], device)
                    runs.setdefault((variant, s), []).append(r)
                    print(f"  {name:12s} {variant} {s:10s} rep {rep + 1}: {r['total_s'] * 1e3:8.0f} ms", flush=True)
        for (variant, s), rs in runs.items():
            times = [r["total_s"] for r in rs]
            stats = {
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "runs_s": times,
                "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in rs)),
                "baseline_rss_bytes": int(statistics.median(r["baseline_rss_bytes"] for r in rs)),
                "parts": {k: statistics.median(r["parts"][k] for r in rs if k in r["parts"]) for k in rs[0]["parts"]},
            }
            if variant == "cold":
                entry["strategies"][s] = stats
            else:
                entry.setdefault("warm", {})[s] = stats
        results["models"][name] = entry
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"\nJSON: {args.json}")
    return 0


def format_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | strategy | cold median ms | spread ms | x eager | x lower bound | peak RSS MB (baseline) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in results["models"].items():
        eager = e["strategies"].get("eager", {}).get("median_s")
        for s, st in e["strategies"].items():
            lines.append(
                f"| {name} | {s} | {st['median_s'] * 1e3:.0f} | {st['min_s'] * 1e3:.0f}-{st['max_s'] * 1e3:.0f} | "
                f"{(eager / st['median_s']) if eager else float('nan'):.2f} | {st['median_s'] / e['lower_bound_s']:.2f} | "
                f"{st['peak_rss_bytes'] / 1e6:.0f} ({st['baseline_rss_bytes'] / 1e6:.0f}) |"
            )
        lines.append(
            f"| {name} | lower bound | {e['lower_bound_s'] * 1e3:.0f} | read {e['read_cold_s'] * 1e3:.0f}, "
            f"forward {e['warm_forward_s'] * 1e3:.0f}, skeleton {e['skeleton_s'] * 1e3:.0f} | | 1.00 | weights {e['weights_bytes'] / 1e6:.0f} MB |"
        )
        for s, st in e.get("warm", {}).items():
            lines.append(f"| {name} | {s} (warm cache) | {st['median_s'] * 1e3:.0f} | {st['min_s'] * 1e3:.0f}-{st['max_s'] * 1e3:.0f} | | | |")
    return "\n".join(lines)


def warm_forward_bench(args: argparse.Namespace) -> int:
    """Warm forwards of a model loaded by the pipeline vs the same weights loaded the stock way,
    alternating in one process: what the gates cost once the model is warm."""
    import asyncio

    import torch

    from cicada_async.bench.strategies import example_inputs, local_spec
    from cicada_async.engine.forward import output_dict
    from cicada_async.engine.modeldir import prepare_imports
    from cicada_async.engine.runtime import Engine

    rows = []
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
        stock = _loaded(d, spec, inputs)
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
        rows.append((name, a, b))
        print(f"{name:12s} warm forward: cicada-loaded {a * 1e3:7.1f} ms, stock-loaded {b * 1e3:7.1f} ms, "
              f"ratio {a / b:.3f} (median of {args.repeat}, alternating)", flush=True)
    return 0


def _main(argv: list[str]) -> int:
    if argv[0] == "--worker":
        print(json.dumps(worker(argv[1], Path(argv[2]), *argv[3:4])))
    elif argv[0] == "--bound":
        print(json.dumps(bound_worker(Path(argv[1]), *argv[2:3])))
    else:
        raise SystemExit("usage: python -m cicada_async.bench.cold_start --worker STRATEGY DIR | --bound DIR")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
