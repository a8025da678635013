"""Cicada's Ray Serve application against Ray Serve's stock multiplexing pattern, on one cluster.

    flock /tmp/cicada-bench.lock python -m cicada_async.bench.ray_serve --models bert-base,gpt2 \\
        --repeat 3 --json bench-results/ray-serve.json
    (one benchmark at a time, on a quiet machine: every figure is a cold start; about 15 s of
    Ray start, then ~20-40 s per measured run with the waits for scale to zero)

The cluster: a local ``ray.cluster_utils.Cluster`` started by this process, a head and one
worker node (``--node-cpus`` logical CPUs each), Serve's HTTP proxy on the head only
(``proxy_location="HeadOnly"``). Both applications are deployed on it side by side and share
everything but their code:

- **cicada**: ``cicada_async.service.ray_serve:build`` with a ``cicada.toml`` that names the
  models (``CicadaIngress`` -> ``CicadaModels``; the engine inside each replica, pipelined cold
  start, dynamic batching). Requests ``POST /cicada/v2/models/{model}/infer``; the ingress
  sets the multiplexed model id from the path.
- **stock**: ``StockModels`` (``ray_stock``), the pattern of Ray Serve's model-multiplexing guide written
  as a user would: ``@serve.multiplexed(max_num_models_per_replica=3)`` on an async loader that
  calls ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` (decoders, ``architectures``
  ending in ``LMHeadModel``/``ForCausalLM``) or ``AutoModel.from_pretrained(dir)`` (encoders),
  ``.eval()``; ``__call__`` reads the same JSON body, builds ``input_ids`` and runs the forward
  under ``torch.inference_mode()``, answering the first output (logits / last_hidden_state) as
  raw bytes. torch threads = the replica's CPUs, set in ``__init__`` (where torch and
  transformers are imported, as at the top of a user's module). Requests
  ``POST /stock/v2/models/{model}/infer`` with Ray's ``serve_multiplexed_model_id`` header.

Ray places the replicas (both nodes are this machine: no network between them); each run
records the node that answered (``cluster.head_node``/``worker_node`` name them).

Same for both: model replicas of ``--replica-cpus`` CPUs (1), torch threads = that; the same
autoscaling config (``min_replicas`` 0, ``max_replicas`` ``--max-replicas`` (1),
``target_ongoing_requests`` 2, ``upscale_delay_s`` 0, ``downscale_delay_s``
``--downscale-delay-s``, metrics every 0.2 s over 0.5 s); ``max_ongoing_requests`` 16 (cicada's
default, so a burst reaches one replica whole in both); three models per replica; the same
weights (``cicada_async.models.catalogue.make_model`` into ``--dir``, default ``models/``);
the same request: a V2 JSON body of ``--seq`` token ids (``input_ids``), the model's first
output asked for in binary (``binary_data_output``: JSON-encoding millions of logits would be
measured instead); the same client (``http.client`` through Ray's proxy, one connection per
request, ``--timeout`` bounding each). Every answer is checked: status 200 and at least
seq x (vocab or hidden) x 2 bytes, i.e. a real forward's output.

What is timed (wall clock in this process, request sent to answer read), per repetition,
strategies interleaved and their order rotated per repetition:

- ``first_answer`` (per model): both applications at zero model replicas (``serve.status``:
  none starting, running or stopping), the model's weights evicted from the page cache and
  checked with mincore (``pagecache.evict_checked``), then one request: Ray starts a replica,
  the replica starts (imports), loads and answers. The answering replica must be one never seen
  before (a fresh process).
- ``switch`` (per model B; A = the next model of ``--models``): from zero replicas, one request
  for A (untimed, recorded) and a second (warm, recorded); B evicted; then one request for B is
  timed: the model switch on a replica that holds another model. It must answer from A's replica.
- ``burst`` (per model B, A as above): from zero replicas, a replica warmed with A as for the
  switch, B evicted, then ``--burst`` (16) concurrent requests for B, released together by a
  barrier: ``all_answered_s`` from the release to the last answer, and each request's own
  latency (median, max). Every request must get an answer (200) or an error (another status,
  counted); an exception or a timeout (a hang) is a failure. All are counted and kept.

Before the first repetition each application answers one request and goes back to zero
(``warmup``, kept in the JSON, not in the medians): the cluster's first worker starts pay
one-off costs (the first import of each package from disk) that neither strategy should carry.

Where the time goes: each app's model replica says how long a request spent inside it (cicada's
``cicada-replica-s`` header, the stock's ``bench-replica-s``, both from the replica's entry to
its answer); ``*_replica_s`` are those, so the rest of a request's time is Ray's path. A first
answer's wait before its replica ran it is split by the replica's clock header (process start,
constructor begun and returned, request entered; wall clock, one machine): Ray starting the
process after the request was sent, the process until the constructor (Ray's worker start and
the class's module), the constructor, and Ray's routing after it (``first_answer_*_s``). After
cicada's switch the bench reads that replica's ``/metrics?model=B`` and keeps the engine's
account of B's cold start (``cold_start``: load, time to first compute, stall, fetch GB/s and
the stages of its timeline). ``cluster.worker_code`` is where the cluster's workers import
``cicada_async`` from (a clean worktree's run must show the worktree).

The JSON: command, commit and machine (``procinfo``), Ray's version, the configuration, every
run, the failed ones, and per strategy the medians; ``ratios`` are cicada / stock of each
median (targets: first answer <= 0.7x, switch <= 0.6x). Exit status 1 when anything failed.

Cleanup: ``serve.shutdown``, ``ray.shutdown``, ``Cluster.shutdown``; then every process this
run started (the descendants of this process, recorded while the cluster ran) that is still
alive is killed by pid, also from an atexit hook and on SIGTERM/SIGINT. Nothing else is
touched: ``ray stop --force`` kills every Ray process of the user on the machine (other runs'
clusters too), so it runs only when ``--ray-stop-force`` asks for it (a dedicated machine).

The code: ``ray_stock`` (the stock app), ``ray_cluster`` (the cluster, Serve, both apps, the
run's processes), ``ray_measures`` (the client and the three measures); this module runs them,
summarizes and writes the JSON.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from cicada_async.bench.procinfo import commit, machine
from cicada_async.bench.ray_cluster import STRATEGIES, Bed, Descendants, Watcher
from cicada_async.bench.ray_measures import Client, burst, first_answer, request_body, switch
from cicada_async.bench.ray_stock import STOCK_MAX_MODELS

MEASURES = ("first_answer", "switch", "burst")
TARGETS = {"first_answer_s": 0.7, "switch_s": 0.6}


# ------------------------------------------------------------------------------ summary, main

# The first answer's wait before its replica ran it, split by the replica's clock (ray_measures.ray_path).
RAY_PATH_KEYS = ["first_answer_entered_after_send_s", "first_answer_process_after_send_s",
                 "first_answer_init_after_process_s", "first_answer_init_s", "first_answer_entered_after_init_s"]
RUN_KEYS = {"first_answer": ["first_answer_s", "first_answer_replica_s", *RAY_PATH_KEYS], "switch": ["switch_s", "switch_replica_s"],
            "burst": ["all_answered_s", "latency_median_s", "latency_max_s"]}


def summarize(runs: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for s in STRATEGIES:
        med: dict[str, dict[str, float | None]] = {}
        for measure, keys in RUN_KEYS.items():
            for key in keys:
                name = key if measure != "burst" else f"burst_{key}"
                for m in models:
                    vals = [r[key] for r in runs if r["strategy"] == s and r["measure"] == measure
                            and r["model"] == m and r.get(key) is not None]
                    med.setdefault(name, {})[m] = statistics.median(vals) if vals else None
        medians[s] = med
    ratios: dict[str, dict[str, float | None]] = {}
    for name, per_model in medians["cicada"].items():
        for m, c in per_model.items():
            b = medians["stock"].get(name, {}).get(m)
            ratios.setdefault(name, {})[m] = round(c / b, 3) if c is not None and b else None
    meets = {name: {m: (r is not None and r <= TARGETS[name]) for m, r in ratios.get(name, {}).items()}
             for name in TARGETS}
    bursts = [r for r in runs if r["measure"] == "burst"]
    counts = {s: {k: sum(r[k] for r in bursts if r["strategy"] == s) for k in ("n", "answered", "errors", "failures")}
              for s in STRATEGIES}
    return {"medians": medians, "ratios_cicada_over_stock": ratios, "targets": TARGETS, "meets_target": meets,
            "burst_requests": counts}


def _fmt(x: float | None) -> str:
    return "      -" if x is None else f"{x:7.2f}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m cicada_async.bench.ray_serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bert-base,gpt2", help="catalogue names, comma separated (at least 2)")
    ap.add_argument("--dir", type=Path, default=Path("models"), help="where catalogue models live (made if missing)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--measures", default=",".join(MEASURES), help="a subset of " + ",".join(MEASURES))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--burst", type=int, default=16, help="concurrent requests of the cold burst")
    ap.add_argument("--seq", type=int, default=32, help="tokens per request")
    ap.add_argument("--node-cpus", type=float, default=2, help="logical CPUs of each of the two nodes")
    ap.add_argument("--replica-cpus", type=float, default=1, help="Ray CPUs of a model replica (torch threads)")
    ap.add_argument("--max-replicas", type=int, default=1)
    ap.add_argument("--max-ongoing", type=int, default=16, help="max_ongoing_requests of a model replica")
    ap.add_argument("--downscale-delay-s", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (a hang fails)")
    ap.add_argument("--zero-timeout", type=float, default=180.0, help="seconds to wait for scale to zero")
    ap.add_argument("--prefetch", choices=["config", "on", "off"], default="config",
                    help="CICADA_PREFETCH in the cluster's environment (config: leave it unset)")
    ap.add_argument("--ray-stop-force", action="store_true",
                    help="also run `ray stop --force` at the end: kills EVERY Ray process of this user")
    ap.add_argument("--json", type=Path, default=Path("bench-results/ray-serve.json"))
    args = ap.parse_args(argv)

    models = [m for m in args.models.split(",") if m]
    measures = [m for m in args.measures.split(",") if m]
    strategies = [s for s in args.strategies.split(",") if s]
    if len(models) < 2 and {"switch", "burst"} & set(measures):
        ap.error("switch and burst need at least two models (A held, B switched to)")
    if set(measures) - set(MEASURES) or set(strategies) - set(STRATEGIES):
        ap.error(f"measures are {MEASURES}, strategies {STRATEGIES}")
    model_dirs: dict[str, Path] = {}
    for m in models:
        d = args.dir / m
        if not (d / "config.json").exists():
            from cicada_async.models.catalogue import make_model

            print(f"making {m} with random weights in {d} ...", flush=True)
            make_model(m, d)
        model_dirs[m] = d
    if args.prefetch != "config":
        os.environ["CICADA_PREFETCH"] = "1" if args.prefetch == "on" else "0"

    import ray

    doc: dict[str, Any] = {
        "command": "python -m cicada_async.bench.ray_serve " + " ".join(argv), "commit": commit(),
        "machine": machine(), "ray": ray.__version__,
        "config": {"models": models, "repeat": args.repeat, "measures": measures, "strategies": strategies,
                   "burst": args.burst, "seq": args.seq, "nodes": 2, "node_cpus": args.node_cpus,
                   "replica_cpus": args.replica_cpus, "torch_threads": max(1, int(args.replica_cpus)),
                   "max_replicas": args.max_replicas, "max_ongoing_requests": args.max_ongoing,
                   "max_models_per_replica": STOCK_MAX_MODELS, "downscale_delay_s": args.downscale_delay_s,
                   "timeout_s": args.timeout, "cicada_prefetch_env": os.environ.get("CICADA_PREFETCH")},
    }
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    procs = Descendants()
    watcher = Watcher(procs)
    bed: Bed | None = None
    done = False

    def cleanup() -> None:
        nonlocal done
        if done:
            return
        done = True
        watcher.halt.set()
        if bed is not None:
            bed.close()
        left = procs.kill_left()
        if left:
            print(f"cleanup: killed {len(left)} leftover processes of this run: {left}", file=sys.stderr, flush=True)
        doc["leftover_processes_killed"] = len(left)
        if args.ray_stop_force:
            subprocess.run(["ray", "stop", "--force"], check=False)
        if bed is not None and not failed:
            shutil.rmtree(bed.tmp, ignore_errors=True)
        elif bed is not None:
            print(f"Ray's logs of this run: {bed.tmp}", file=sys.stderr, flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watcher.start()
    try:
        bodies = {m: request_body(d, args.seq) for m, d in model_dirs.items()}
        bed = Bed(args, model_dirs, procs)
        doc["cluster"] = {"ray_start_s": bed.ray_start_s, "serve_run_s": bed.serve_run_s,
                          "autoscaling": bed.autoscaling, "head_node": getattr(bed.cluster.head_node, "node_id", None),
                          "worker_node": bed.worker.node_id, "worker_code": bed.worker_code,
                          "driver_code": str(Path(__file__).resolve().parent.parent.parent)}
        print(f"cluster up in {bed.ray_start_s:.1f} s; serve.run " +
              ", ".join(f"{k} {v:.1f} s" for k, v in bed.serve_run_s.items()), flush=True)
        client = Client(bed.port, bodies, args.timeout)
        seen: dict[str, set[str]] = {s: set() for s in strategies}
        for s in strategies:  # warm-up: the cluster's one-off costs, kept apart
            try:
                runs.append({"rep": -1, "strategy": s, "measure": "warmup", "model": models[0],
                             **first_answer(bed, client, s, models[0], model_dirs[models[0]], seen[s], args.zero_timeout)})
                print(f"warmup {s}: {runs[-1]['first_answer_s']:.2f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - counted and shown
                failed.append({"rep": -1, "strategy": s, "measure": "warmup", "error": f"{type(e).__name__}: {e}"})
                print(f"warmup {s}: FAILED {e}", flush=True)
        for rep in range(args.repeat):
            order = strategies[rep % len(strategies):] + strategies[: rep % len(strategies)]
            for measure in measures:
                for i, m in enumerate(models):
                    a = models[(i + 1) % len(models)]
                    for s in order:
                        label = f"rep {rep} {measure:12s} {s:6s} {m}" + (f" (holding {a})" if measure != "first_answer" else "")
                        try:
                            if measure == "first_answer":
                                r = first_answer(bed, client, s, m, model_dirs[m], seen[s], args.zero_timeout)
                            elif measure == "switch":
                                r = switch(bed, client, s, a, m, model_dirs[m], seen[s], args.zero_timeout)
                            else:
                                r = burst(bed, client, s, a, m, model_dirs[m], args.burst, seen[s], args.zero_timeout)
                        except Exception as e:  # noqa: BLE001 - counted and shown, never dropped silently
                            failed.append({"rep": rep, "strategy": s, "measure": measure, "model": m,
                                           "error": f"{type(e).__name__}: {e}"})
                            print(f"{label}: FAILED {e}", flush=True)
                            continue
                        runs.append({"rep": rep, "strategy": s, "measure": measure, "model": m, **r})
                        if measure == "burst":
                            print(f"{label}: all answered {_fmt(r['all_answered_s'])} s, median "
                                  f"{_fmt(r['latency_median_s'])} s, max {_fmt(r['latency_max_s'])} s; "
                                  f"{r['answered']}/{r['n']} answered, {r['errors']} errors, {r['failures']} failures",
                                  flush=True)
                            if r["answered"] != r["n"]:
                                failed.append({"rep": rep, "strategy": s, "measure": measure, "model": m,
                                               "error": f"{r['n'] - r['answered']} of {r['n']} not answered: {r['problems']}"})
                        else:
                            print(f"{label}: {_fmt(r[RUN_KEYS[measure][0]])} s", flush=True)
    finally:
        cleanup()
    summary = summarize(runs, models)
    summary["failed"] = len(failed)
    print("\nmedians (s), cicada / stock:")
    for name, per_model in summary["medians"]["cicada"].items():
        for m in models:
            c, b = per_model.get(m), summary["medians"]["stock"].get(name, {}).get(m)
            ratio = summary["ratios_cicada_over_stock"][name][m]
            target = f"  (target <= {TARGETS[name]}x)" if name in TARGETS else ""
            print(f"  {name:28s} {m:12s} cicada {_fmt(c)}  stock {_fmt(b)}  "
                  f"{'-' if ratio is None else f'{ratio:.2f}x'}{target}")
    if failed:
        print(f"FAILED: {len(failed)} (listed in the JSON)")
    doc.update({"summary": summary, "runs": runs, "failed_runs": failed})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    # The stock deployment lives in ray_stock, which Ray's workers import by name (not __main__).
    sys.exit(main())
