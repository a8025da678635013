"""The ``cicada`` command: make models, plan, run one cold inference, benchmark, serve."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from protocols.errors import CicadaError

if TYPE_CHECKING:  # annotations only: the commands import what they run when they run
    from protocols.manifest import Plan

    from cicada_async.engine.modeldir import ModelSpec
    from cicada_async.engine.timeline import Timeline


def _add_model_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="serve in this dtype")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cicada", description=__doc__)
    ap.add_argument("--traceback", action="store_true", help="show Python tracebacks on errors")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-model", help="write a model directory with random weights")
    p.add_argument("name", help="catalogue name, e.g. gpt2, bert-base, tiny-llama")
    p.add_argument("dst", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-bytes", type=int, help="split weights into shards with an index")

    p = sub.add_parser("plan", help="print a model's execution plan: shards and reads")
    p.add_argument("model", help="model directory or URI")
    p.add_argument("--read-bytes", type=int, default=8 << 20)

    p = sub.add_parser("run", help="one cold inference")
    p.add_argument("model", help="model directory (or URI with --strategy cicada)")
    p.add_argument("--input", type=Path, help="safetensors file of named inputs (default: random)")
    p.add_argument("--output", type=Path, help="write named outputs here (safetensors)")
    p.add_argument("--strategy", choices=["cicada", "eager", "meta-mmap", "hf"], default="cicada")
    p.add_argument("--timeline", type=Path, help="write the cold start's timeline (JSON)")
    p.add_argument("--plot", type=Path, help="draw the timeline as a Gantt chart (PNG)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    _add_model_opts(p)

    p = sub.add_parser("demo", help="make a demo model and cold-start it beside plain PyTorch")
    p.add_argument("--model", default="gpt2", help="catalogue name of the demo model")
    p.add_argument("--dir", type=Path, default=Path("models"))

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("cold-start", help="cold start per model and strategy, side by side")
    b.add_argument("--models", default="gpt2,gpt2-medium,bert-base,resnet-50,vit-base")
    b.add_argument("--strategies", default="cicada,eager,meta-mmap,hf")
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--json", type=Path, default=Path("bench-results/cold-start.json"))
    b.add_argument("--dir", type=Path, default=Path("models"), help="where catalogue models are made")
    b.add_argument("--warm", action="store_true", help="also run with the page cache warm")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where every strategy computes")
    b.add_argument("--storage", default="local",
                   help="comma list of local,http,s3; remote storage adds download-then-load")
    b.add_argument("--bandwidth-mbps", default="0,125,500",
                   help="link rates in MB/s for remote storage, shaped by tc in a network namespace; 0 = unshaped")

    mm = bsub.add_parser("multi-model", help="many models, a heavy-tailed trace, shared vs serialized loads")
    mm.add_argument("--duration", type=float, default=60.0, help="seconds of trace")
    mm.add_argument("--seed", type=int, default=7)
    mm.add_argument("--budget", type=int, default=1_200_000_000, help="memory_budget_bytes of the server")
    mm.add_argument("--dir", type=Path, default=Path("models"), help="where catalogue models are made")
    mm.add_argument("--json", type=Path, default=Path("bench-results/multi-model.json"))
    mm.add_argument("--pair", help="instead: tiny-bert warm while this model cold-starts, evicted and resident")
    mm.add_argument("--rounds", type=int, default=5, help="cold starts per page-cache state (with --pair)")

    w = bsub.add_parser("warm-forward", help="warm forward after a pipelined load vs a stock load")
    w.add_argument("--models", default="gpt2,bert-base")
    w.add_argument("--repeat", type=int, default=30)
    w.add_argument("--dir", type=Path, default=Path("models"))

    bsub.add_parser("process-start", add_help=False,
                    help="spawn of a fresh cicada serve to its first answer, against torch + one forward")
    bsub.add_parser("generate", add_help=False,
                    help="warm generation: transformers, cicada serve's streamed completions, llama.cpp")
    bsub.add_parser("ray-serve", add_help=False,
                    help="cicada's Ray Serve app against Ray Serve's stock multiplexing, on one cluster")
    bsub.add_parser("first-token", add_help=False,
                    help="cold time to first token of an LLM, served, against transformers, llama.cpp and the bound")

    p = sub.add_parser("pack", help="rewrite a checkpoint in execution order with a sha256 manifest")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)

    p = sub.add_parser("serve", help="serve models over the V2 inference protocol", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and not {"-h", "--help"} & set(argv):
        from cicada_async.bench.onebench import one_bench_at_a_time

        with one_bench_at_a_time():
            return _main(argv)
    return _main(argv)


def _main(argv: list[str]) -> int:
    # Before anything imports torch (seconds): start reading the weights the command will need.
    from cicada_async.engine.prefetch import start_for_cli

    start_for_cli([a for a in argv if a != "--traceback"])
    if argv[:2] == ["bench", "process-start"]:
        from cicada_async.bench.process_start import main as process_start

        return _guard(lambda: process_start(argv[2:]), "--traceback" in argv)
    if argv[:2] == ["bench", "generate"]:
        from cicada_async.bench.generate import main as generate_bench

        return _guard(lambda: generate_bench(argv[2:]), "--traceback" in argv)
    if argv[:2] == ["bench", "ray-serve"]:
        from cicada_async.bench.ray_serve import main as ray_serve_bench

        return _guard(lambda: ray_serve_bench(argv[2:]), "--traceback" in argv)
    if argv[:2] == ["bench", "first-token"]:
        from cicada_async.bench.first_token import main as first_token_bench

        return _guard(lambda: first_token_bench([a for a in argv[2:] if a != "--traceback"]), "--traceback" in argv)
    if argv and argv[0] == "serve":
        from cicada_async.engine import importgc  # stdlib only

        with importgc.paused():  # the collector's passes were 0.22 s of this import's 1.46 s
            from cicada_async.service.server import main as serve_main

        return _guard(lambda: serve_main(argv[1:]), "--traceback" in argv)
    args = build_parser().parse_args(argv)
    show_tb = args.traceback or os.environ.get("CICADA_TRACEBACK") == "1"
    return _guard(lambda: _dispatch(args), show_tb)


def _guard(fn, show_tb: bool) -> int:  # type: ignore[no-untyped-def]
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        return 130
    except CicadaError as e:
        if show_tb:
            raise
        print(f"cicada: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line for users, traceback on request
        if show_tb:
            raise
        print(f"cicada: internal error: {type(e).__name__}: {e} (run with --traceback for details)", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "make-model":
        from cicada_async.models.catalogue import make_model

        out = make_model(args.name, args.dst, seed=args.seed, dtype=args.dtype, max_shard_bytes=args.max_shard_bytes)
        print(f"wrote {args.name} to {out}")
        return 0
    if args.cmd == "plan":
        return _plan(args)
    if args.cmd == "run":
        return _run(args)
    if args.cmd == "demo":
        return _demo(args)
    if args.cmd == "bench":
        if args.bench == "multi-model" and args.pair:
            from cicada_async.bench.multi_model_pair import pair_bench

            return pair_bench(args)
        if args.bench == "multi-model":
            from cicada_async.bench.multi_model import multi_model_bench

            return multi_model_bench(args)
        if args.bench == "warm-forward":
            from cicada_async.bench.cold_start import warm_forward_bench

            return warm_forward_bench(args)
        if args.storage.strip() != "local":
            from cicada_async.bench.remote import remote_cold_start_bench

            return remote_cold_start_bench(args)
        from cicada_async.bench.cold_start import cold_start_bench

        return cold_start_bench(args)
    if args.cmd == "pack":
        return _pack(args)
    raise AssertionError(args.cmd)


def _plan(args: argparse.Namespace) -> int:
    from cicada_async.engine.plan import format_plan

    print(format_plan(_execution_plan(args.model, args.read_bytes)[1]))
    return 0


def _execution_plan(model: str, read_bytes: int = 8 << 20) -> tuple[ModelSpec, Plan]:
    import asyncio

    from backends import open_backend

    from cicada_async.engine.executor import Executor
    from cicada_async.engine.job import LoadOptions
    from cicada_async.engine.pipeline import prepare
    from cicada_async.engine.timeline import Timeline

    async def go() -> tuple[ModelSpec, Plan]:
        backend = open_backend(model)
        ex = Executor()
        ex.start()
        try:
            spec, _, _, plan, _ = await prepare(
                backend, ex, LoadOptions(read_bytes=read_bytes), Timeline(),
                alignment=backend.alignment,
            )
            return spec, plan
        finally:
            await backend.aclose()
            await asyncio.to_thread(ex.stop)

    return asyncio.run(go())


def _pack(args: argparse.Namespace) -> int:
    from cicada_async.engine.pack import pack

    spec, plan = _execution_plan(str(args.src))
    order = [t for shard in plan.shards for t in shard.tensors]
    manifest = pack(args.src, args.dst, order, plan=(spec, plan))
    print(f"packed {args.src} into {args.dst} in execution order ({plan.order_source}); "
          f"{len(manifest['files'])} file(s) with sha256 in cicada.manifest.json")
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from cicada_async.bench.strategies import RUNNERS, example_inputs, local_spec
    from cicada_async.engine.modeldir import prepare_imports

    if args.strategy != "cicada" and "://" in args.model and not args.model.startswith("file://"):
        raise CicadaError(f"strategy {args.strategy!r} reads local directories only")
    spec = local_spec(args.model) if "://" not in args.model else None
    if args.input:
        if not args.input.is_file():
            raise CicadaError(f"input file {args.input} does not exist")
        inputs = load_file(str(args.input))
    elif spec is not None:
        inputs = example_inputs(spec)
    else:
        raise CicadaError("--input is required for a remote model")
    if spec is not None:
        prepare_imports(spec)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    timelines: list[Timeline] = []
    t0 = time.perf_counter()
    if args.strategy == "cicada":
        out, t = RUNNERS["cicada"](args.model, spec, inputs, dtype, args.device, timeline_out=timelines)
    else:
        out, t = RUNNERS[args.strategy](Path(args.model), spec, inputs, dtype, args.device)
    total = time.perf_counter() - t0
    parts = "  ".join(f"{k[:-2]} {v * 1e3:.0f} ms" for k, v in t.items() if k.endswith("_s") and k != "total_s")
    print(f"{args.strategy}: cold inference {total * 1e3:.0f} ms  ({parts})")
    if timelines:
        s = timelines[0].summary()
        print(
            f"  first compute at {(s['time_to_first_compute_s'] or 0) * 1e3:.0f} ms, stall {s['stall_s'] * 1e3:.0f} ms, "
            f"overlap {s['utilization']:.2f}, {s['bytes'] / 1e6:.0f} MB at {(s['gbps'] or 0):.2f} GB/s"
        )
        if args.timeline:
            args.timeline.write_bytes(timelines[0].to_json())
        if args.plot:
            timelines[0].plot(args.plot, title=f"{Path(str(args.model)).name} cold start")
    elif args.timeline or args.plot:
        print("  (--timeline and --plot apply to --strategy cicada)", file=sys.stderr)
    if args.output:
        save_file({k: v.contiguous() for k, v in out.items()}, str(args.output))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import subprocess

    from cicada_async.models.catalogue import make_model

    model_dir = args.dir / args.model
    if not (model_dir / "model.safetensors").exists() and not (model_dir / "model.safetensors.index.json").exists():
        print(f"making {args.model} with random weights in {model_dir} ...")
        make_model(args.model, model_dir)
    from cicada_async.bench.cold_start import drop_page_cache

    for strategy in ("eager", "cicada"):
        drop_page_cache(model_dir)
        # A fresh process each, so neither inherits the other's warm state.
        subprocess.run([sys.executable, "-m", "cicada_async", "run", str(model_dir), "--strategy", strategy], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
