"""One small measurement: a node-cache hit's cold start vs the same model's from local disk.

    PYTHONPATH=. .venv/bin/python scripts/node-cache-figure.py [MODEL_DIR] [--repeat 5]

nginx serves MODEL_DIR's parent on 127.0.0.1; one load from it fills a fresh node cache; then
cold starts alternate, in fresh Engines of this one process (imports done, page cache warm for
both): from MODEL_DIR on local disk, and from nginx through the cache (a hit). Prints medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from cicada_async.bench.origins import find_nginx, free_port, spawn_nginx, stop_process, wait_port
from cicada_async.bench.strategies import example_inputs, local_spec
from cicada_async.engine.modeldir import prepare_imports
from cicada_async.engine.runtime import Engine


async def cold_start(uri: str, inputs: dict, cache: dict | None) -> float:
    async with Engine(warm_imports=False, node_cache=cache) as engine:
        inst = engine.instance("m", uri, describe=False)
        t0 = time.perf_counter()
        await inst.infer(inputs)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path, default=Path("models/repository/gpt2"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="write the runs, command, commit and machine")
    args = ap.parse_args()
    from cicada_async.bench.cold_start_report import finish_provenance, script_provenance

    prov = script_provenance("scripts/node-cache-figure.py")  # before measuring: the load at the start
    model = args.model.resolve()
    spec = local_spec(model)
    prepare_imports(spec)
    inputs = example_inputs(spec, seq=128)
    nginx = find_nginx()
    if nginx is None:
        raise SystemExit("nginx is not installed (scripts/setup.sh installs it)")
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = spawn_nginx(nginx, model.parent, Path(tmp), port)
        stack.callback(stop_process, proc)
        wait_port(port, proc)
        uri = f"http://127.0.0.1:{port}/{model.name}/"
        cache = {"dir": f"{tmp}/cache", "max_bytes": 4 << 30}
        fill = asyncio.run(cold_start(uri, inputs, cache))
        print(f"miss (fills the cache): {fill * 1e3:.0f} ms", flush=True)
        times: dict[str, list[float]] = {"local": [], "hit": []}
        for _ in range(args.repeat):
            times["local"].append(asyncio.run(cold_start(str(model), inputs, None)))
            times["hit"].append(asyncio.run(cold_start(uri, inputs, cache)))
    local, hit = statistics.median(times["local"]), statistics.median(times["hit"])
    print(f"{model.name}: local disk {local * 1e3:.0f} ms, cache hit {hit * 1e3:.0f} ms, "
          f"ratio {hit / local:.3f} (medians of {args.repeat}, alternating)")
    if args.json is not None:
        import json

        args.json.write_text(json.dumps({
            **finish_provenance(prov), "model": model.name, "repeat": args.repeat, "miss_fill_s": fill,
            "runs_s": times, "median_local_s": local, "median_hit_s": hit, "hit_over_local": hit / local,
            "clock": "a fresh Engine per cold start in one process, imports done, page cache warm; from just before the first infer() to its return",
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
