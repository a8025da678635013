"""What a kept skeleton costs: memory of one model's ReadySkeleton (pristine + spare), and the
times of a warm skeleton build and of a deepcopy of the meta skeleton. Configs only, no weights.

    .venv/bin/python scripts/skeleton-memory.py gpt2 bert-base [--json PATH]   # prints JSON
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import sys
import time
import tracemalloc

import torch
import transformers

from cicada_async.engine.modeldir import ModelSpec, example_inputs_for, import_conversion_mapping
from cicada_async.engine.ready import ReadySkeleton
from cicada_async.engine.skeleton import build_skeleton
from cicada_async.models.catalogue import ZOO


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def spec_for(name: str) -> ModelSpec:
    e = ZOO[name]
    cfg = transformers.AutoConfig.for_model(e.model_type, **e.config).to_dict()
    cfg["architectures"] = [e.architecture]
    return ModelSpec("transformers", e.architecture, cfg, ["model.safetensors"], example_inputs_for("transformers", cfg))


def ms(fn, n: int = 5) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 1)


def main(names: list[str], json_path: str | None = None) -> None:
    from cicada_async.bench.cold_start_report import finish_provenance, script_provenance

    prov = script_provenance("scripts/skeleton-memory.py")  # before measuring: the load at the start
    torch.set_num_threads(1)
    import_conversion_mapping()
    out = {}
    for name in names:
        spec = spec_for(name)
        t = time.perf_counter()
        model = build_skeleton(spec, None)  # the first build in a process imports the class
        first = round((time.perf_counter() - t) * 1e3, 1)
        build = ms(lambda: build_skeleton(spec, None))
        deepcopy = ms(lambda m=model: copy.deepcopy(m))
        del model
        gc.collect()
        tracemalloc.start()
        r0 = rss()
        ready = ReadySkeleton(name)
        ready.build(spec, None)  # what a prebuilt model keeps: pristine and spare
        gc.collect()
        traced, _ = tracemalloc.get_traced_memory()
        r1 = rss()
        tracemalloc.stop()
        out[name] = {"first_build_ms": first, "warm_build_ms": build, "deepcopy_ms": deepcopy,
                     "kept_traced_kib": round(traced / 1024), "kept_rss_delta_kib": round((r1 - r0) / 1024)}
        del ready
        gc.collect()
    doc = {"torch": torch.__version__, "transformers": transformers.__version__,
           "cores": os.cpu_count(), "models": out}
    print(json.dumps(doc, indent=1))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({**finish_provenance(prov), **doc}, f, indent=1)


if __name__ == "__main__":
    argv = sys.argv[1:]
    path = None
    if "--json" in argv:
        i = argv.index("--json")
        path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    main(argv or ["gpt2", "bert-base"], path)
