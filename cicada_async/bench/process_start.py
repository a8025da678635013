"""Process cold start: from spawning ``cicada serve`` to the first answer of an infer request.

    flock /tmp/cicada-bench.lock python -m cicada_async.bench.process_start --model gpt2-medium --repeat 3
    (or: cicada bench process-start ...)

Each repetition runs, interleaved and in an order rotated per repetition:

- the **baseline** (the floor): a fresh ``python -c`` that imports torch and transformers the
  plain way (Python's collector on, as any script; ``cicada serve`` imports with it paused,
  ``engine/importgc.py``), builds the model on meta, assigns the mmapped safetensors (weights
  warm in the page cache, checked with mincore) and runs one forward of the same 128 tokens;
  timed from spawn to the forward's end. Target (issue 28): spawn to first answer at most
  1.25x this. The same floor with the collector paused during its imports and its objects
  frozen after (``baseline gc-paused``) runs beside it, so the figure can be read both ways;
- a fresh ``cicada serve`` per mode (``--prefetch on/off``: the weights read into the page
  cache from the CLI's first statement, ``CICADA_PREFETCH``), its weights evicted first and the
  eviction verified with mincore; spawn to the first answer, split into:

  - ``to_start_log``: spawn to the server's ``"event": "start"`` log line (imports, config);
  - ``start_to_live``: the app and engine set up, the socket listening, the first live answer;
  - ``first_response``: the infer request sent to its answer; within it ``cold_start`` (the
    server's ``"event": "cold_start"`` line, load start to weights resident) and the rest.

  After the first answer the model is unloaded, its pages dropped again and the same request
  sent: that second cold response, in a process whose imports are done, is the model's own
  cost; ``process_overhead`` is the total minus it.

Beside each time, the memory-time a platform bills for it: the child's VmRSS sampled every
10 ms from spawn to answer, as peak x duration (``gb_seconds``) and as the integral
(``gb_seconds_held``), GB = 2**30 bytes; and the server's own figure for the load alone (its
cold start line's ``memory``, what /metrics reports). Import times of fresh interpreters are
measured in the same run. Failed runs are counted, listed in the JSON and make the exit
status 1. The JSON records the command, the commit and the machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cicada_async.bench.origins import stop_process
from cicada_async.bench.pagecache import evict, evict_checked, files_of, resident_bytes, warm
from cicada_async.bench.procinfo import ChildRss, commit, machine

TARGET = 1.25  # issue 28: spawn to first answer at most 1.25x imports + one warm forward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 600.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def example_request(model_dir: Path, seq: int = 128) -> bytes:
    """A V2 JSON infer body: token ids for text models, pixel values for vision models."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if "vocab_size" in cfg:
        vocab = int(cfg["vocab_size"])
        data = [(i * 7919) % vocab for i in range(seq)]
        inp = {"name": "input_ids", "datatype": "INT64", "shape": [1, seq], "data": data}
    else:
        size = int(cfg.get("image_size", 224))
        ch = int(cfg.get("num_channels", 3))
        n = ch * size * size
        inp = {"name": "pixel_values", "datatype": "FP32", "shape": [1, ch, size, size],
               "data": [((i % 255) / 255.0) for i in range(n)]}
    # Binary outputs: the logits of a text model are millions of floats, and JSON-encoding
    # them would be measured instead of the cold start (tritonclient asks for binary too).
    return json.dumps({"inputs": [inp], "parameters": {"binary_data_output": True}}).encode()


def _architecture(model_dir: Path) -> str | None:
    try:
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    return archs[0] if archs else None


def time_python(code: str, env: dict[str, str] | None = None) -> float:
    """Wall seconds of ``python -c code`` in a fresh interpreter (spawn to exit)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - t0


class _LogReader(threading.Thread):
    """Reads the server's JSON log lines from stderr, keeping each with its arrival time."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.cond = threading.Condition()

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):
            text = line.decode(errors="replace").rstrip()
            with self.cond:
                self.raw.append(text)
                try:
                    doc = json.loads(text)
                except ValueError:
                    doc = None
                if isinstance(doc, dict):
                    self.events.append(doc)
                self.cond.notify_all()

    def wait_event(self, event: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if e.get("event") == event:
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


# ``cicada serve`` with Engine(warm_imports=False): transformers is then imported by the first
# cold start instead of on the idle executor thread right after start.
_NO_WARM_IMPORTS = (
    "import sys, functools; import cicada_async.engine.runtime as e; init = e.Engine.__init__; "
    "e.Engine.__init__ = functools.partialmethod(init, warm_imports=False); "
    "from cicada_async.service.server import main; sys.exit(main(sys.argv[1:]))"
)

# The reference: a fresh process that only imports torch and transformers, builds the model on
# meta, assigns the mmapped (page-cache-warm) weights and runs one forward of the same request.
_BASELINE = r"""
import gc, json, sys, time
paused = sys.argv[2:] == ["paused"]  # the floor with importgc's treatment: collector off, then frozen
if paused:
    gc.disable()
import torch, transformers
from safetensors.torch import load_file
d = sys.argv[1]
cls = getattr(transformers, json.load(open(d + "/config.json"))["architectures"][0])
if paused:
    gc.freeze(); gc.enable()
t_imports = time.time()
config = transformers.AutoConfig.from_pretrained(d)
with torch.device("meta"):
    model = cls(config)
model.load_state_dict(load_file(d + "/model.safetensors"), strict=False, assign=True)
model.tie_weights()
model.eval()
ids = torch.tensor([[(i * 7919) % config.vocab_size for i in range(128)]])
with torch.inference_mode():
    out = model(input_ids=ids)
t_done = time.time()
print(json.dumps({"t_imports": t_imports, "t_done": t_done, "threads": torch.get_num_threads(),
                  "shape": list(out.logits.shape)}), flush=True)
"""


def baseline_run(model_dir: Path, paused: bool = False) -> dict[str, Any]:
    """Spawn to the forward's end of the reference process, weights warm in the page cache."""
    resident = warm(model_dir)
    t_spawn = time.time()
    proc = subprocess.Popen([sys.executable, "-c", _BASELINE, str(model_dir.resolve()), *(["paused"] if paused else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rss = ChildRss(proc.pid)
    out, err = proc.communicate(timeout=600)
    rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"baseline exited with {proc.returncode}: {err.decode()[-500:]}")
    doc = json.loads(out.decode().strip().splitlines()[-1])
    return {"kind": "baseline", "resident_before_bytes": resident, "total_s": doc["t_done"] - t_spawn,
            "to_imports_s": doc["t_imports"] - t_spawn, "threads": doc["threads"],
            "cost": rss.cost(t_spawn, doc["t_done"])}


def one_run(model: str, model_dir: Path, *, warm_imports: bool, prefetch: bool, drop: bool,
            poll_s: float = 0.005) -> dict[str, Any]:
    resident = evict_checked(model_dir) if drop else sum(resident_bytes(f) for f in files_of(model_dir))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cicada.toml"
        cfg.write_text(f'[models.{json.dumps(model)}]\nuri = {json.dumps(str(model_dir.resolve()))}\n')
        port = free_port()
        env = dict(os.environ, PORT=str(port), CICADA_PREFETCH="1" if prefetch else "0")
        body = example_request(model_dir)
        if warm_imports:
            cmd = [sys.executable, "-m", "cicada_async", "serve", "--config", str(cfg)]
        else:
            # (bypasses the CLI entry, so it is never combined with the prefetch)
            cmd = [sys.executable, "-c", _NO_WARM_IMPORTS, "--config", str(cfg)]
        t_spawn = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rss = ChildRss(proc.pid)
        reader = _LogReader(proc.stderr)
        reader.start()
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}: {' | '.join(reader.raw[-5:])}")
                try:
                    status, _ = _http(port, "GET", "/v2/health/live", timeout=5)
                    if status == 200:
                        break
                except OSError:
                    pass
                time.sleep(poll_s)
            t_live = time.time()
            status, out = _http(port, "POST", f"/v2/models/{model}/infer", body)
            t_answer = time.time()
            rss.stop()
            if status != 200:
                raise RuntimeError(f"infer answered {status}: {out[:300]!r}")
            start = reader.wait_event("start", 10)
            cold = reader.wait_event("cold_start", 30)
            # The same model's cold start again in this now-warm process (imports done, weights
            # dropped from memory and from the page cache): the model's own cost.
            status, out = _http(port, "POST", f"/v2/repository/models/{model}/unload", b"{}")
            if status != 200:
                raise RuntimeError(f"unload answered {status}: {out[:300]!r}")
            if drop:
                evict(model_dir)
            resident2 = sum(resident_bytes(f) for f in files_of(model_dir))
            t_req2 = time.time()
            status, out = _http(port, "POST", f"/v2/models/{model}/infer", body)
            t_answer2 = time.time()
            if status != 200:
                raise RuntimeError(f"second infer answered {status}: {out[:300]!r}")
        finally:
            stop_process(proc, timeout=60)
            reader.join(5)
    assert start is not None and cold is not None, "server logged no start/cold_start line"
    cold_s = float(cold["wall_s"])
    timeline = cold.get("timeline") or {}
    pf = start.get("prefetch") or {}
    r: dict[str, Any] = {
        "kind": "serve", "warm_imports": warm_imports, "prefetch": prefetch,
        "resident_before_bytes": resident,
        "total_s": t_answer - t_spawn,
        "to_start_log_s": float(start["ts"]) - t_spawn,
        "start_to_live_s": t_live - float(start["ts"]),
        "spawn_to_live_s": t_live - t_spawn,
        "first_response_s": t_answer - t_live,
        "cold_start_s": cold_s,
        "rest_of_response_s": (t_answer - t_live) - cold_s,
        "ttfc_s": timeline.get("time_to_first_compute_s"),
        "prefetch_started_s": pf["started_at"] - t_spawn if pf.get("started_at") else None,
        "prefetch_torch_loaded_at_start": pf.get("torch_loaded_at_start"),
        "cost": rss.cost(t_spawn, t_answer),  # the process, spawn to the first answer
        "cold_start_memory": timeline.get("memory"),  # the load alone, as /metrics reports it
        # the model's own cold first response, measured in the warm process
        "model_cold_response_s": t_answer2 - t_req2,
        "resident_before_second_bytes": resident2,
    }
    # Everything the process adds on top of the model's own cold start.
    r["process_overhead_s"] = r["total_s"] - r["model_cold_response_s"]
    return r


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:7.0f}"


KEYS = ["total_s", "to_start_log_s", "start_to_live_s", "first_response_s", "cold_start_s",
        "rest_of_response_s", "model_cold_response_s", "process_overhead_s"]


def _median(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> float | None:
    vals = [(r[key] or {}).get(sub) if sub else r[key] for r in runs]
    present: list[float] = [v for v in vals if v is not None]
    return statistics.median(present) if present else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="cicada bench process-start", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-medium", help="catalogue name (made with make-model if missing)")
    ap.add_argument("--dir", type=Path, default=Path("models"), help="where catalogue models live")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prefetch", choices=["on", "off", "both"], default="both",
                    help="the weights read into the page cache from the CLI's first statement (CICADA_PREFETCH)")
    ap.add_argument("--warm-imports", dest="warm_imports", choices=["on", "off", "both"], default="on",
                    help="the engine's import of transformers on its idle thread at start (Engine(warm_imports))")
    ap.add_argument("--no-paused-floor", dest="paused_floor", action="store_false", help="skip 'baseline gc-paused'")
    ap.add_argument("--import-repeat", type=int, default=1, help="fresh interpreters per import measurement")
    ap.add_argument("--no-drop", action="store_true", help="keep the weights in the page cache")
    ap.add_argument("--json", type=Path, default=Path("bench-results/process-start.json"))
    args = ap.parse_args(argv)

    model_dir = args.dir / args.model
    if not (model_dir / "config.json").exists():
        from cicada_async.models.catalogue import make_model

        print(f"making {args.model} with random weights in {model_dir} ...", flush=True)
        make_model(args.model, model_dir)
    where = {"command": "python -m cicada_async.bench.process_start " + " ".join(argv), **commit(),
             "machine": machine()}

    arch = _architecture(model_dir)
    # Imports on their own, fresh interpreters, this run's conditions (warm package files).
    imports: dict[str, list[float]] = {"python -c pass": [], "import cicada_async.cli": [],
                                       "import cicada_async.service.server": [], "import torch": [],
                                       "import torch + transformers class": []}
    hf = f"import torch, transformers; transformers.{arch}" if arch else "import torch, transformers"
    for _ in range(args.import_repeat):
        for name, code in (("python -c pass", "pass"), ("import cicada_async.cli", "import cicada_async.cli"),
                           ("import torch", "import torch"),
                           ("import cicada_async.service.server", "import cicada_async.service.server"),
                           ("import torch + transformers class", hf)):
            imports[name].append(time_python(code))

    wi_modes = {"on": [True], "off": [False], "both": [False, True]}[args.warm_imports]
    pf_modes = {"on": [True], "off": [False], "both": [True, False]}[args.prefetch]
    configs = [(pf, wi) for pf in pf_modes for wi in wi_modes if pf is False or wi]
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for i in range(args.repeat):
        # Interleaved, and the order rotated per repetition, so drift hits every mode alike.
        plan: list[tuple[bool, bool] | str] = ["baseline", *(["baseline gc-paused"] if args.paused_floor else []), *configs]
        plan = plan[i % len(plan):] + plan[: i % len(plan)]
        for c in plan:
            label = c if isinstance(c, str) else f"serve prefetch={'on' if c[0] else 'off'} warm-imports={'on' if c[1] else 'off'}"
            try:
                r = baseline_run(model_dir, paused=c != "baseline") if isinstance(c, str) else \
                    one_run(args.model, model_dir, prefetch=c[0], warm_imports=c[1], drop=not args.no_drop)
            except Exception as e:  # noqa: BLE001 - counted and shown, never dropped silently
                failed.append({"rep": i, "run": label, "error": f"{type(e).__name__}: {e}"})
                print(f"rep {i} {label}: FAILED {e}", flush=True)
                continue
            r["rep"], r["label"] = i, label
            runs.append(r)
            figs = [f"total {_fmt(r['total_s'])}"] + ([f"{k[:-2]} {_fmt(r[k])}" for k in KEYS[1:]] if not isinstance(c, str) else [])
            gbs = r["cost"]["gb_seconds"]
            print(f"rep {i} {label:38s} " + "  ".join(figs) + f" ms  {gbs or 0:.2f} GB-s", flush=True)

    print(f"\n{args.model}: medians of {args.repeat} (ms)")
    imports = {k: v for k, v in imports.items() if v}
    print("  imports, each in a fresh interpreter:")
    for k, v in imports.items():
        print(f"    {k:40s} {statistics.median(v) * 1e3:7.0f}")
    labels = sorted({r["label"] for r in runs}, key=lambda x: (not x.startswith("baseline"), x))
    medians: dict[str, Any] = {}
    for label in labels:
        sel = [r for r in runs if r["label"] == label]
        keys = KEYS if not label.startswith("baseline") else ["total_s", "to_imports_s"]
        med = {k: _median(sel, k) for k in keys}
        med.update({f"cost_{k}": _median(sel, "cost", k) for k in ("gb_seconds", "gb_seconds_held", "rss_peak_bytes")})
        if not label.startswith("baseline"):
            med["cold_start_gb_seconds"] = _median(sel, "cold_start_memory", "gb_seconds")
        med["n"] = len(sel)
        medians[label] = med
        print(f"  {label:38s} " + "  ".join(f"{k[:-2]} {_fmt(med[k])}" for k in keys)
              + f"  {med['cost_gb_seconds'] or 0:.2f} GB-s (peak RSS x spawn to answer)")
    base = medians.get("baseline", {}).get("total_s")
    ratios, to_paused, paused_base = {}, {}, medians.get("baseline gc-paused", {}).get("total_s")
    for label, med in medians.items():
        if not label.startswith("baseline") and base and med["total_s"] is not None:
            ratios[label] = med["total_s"] / base
            print(f"  {label}: {ratios[label]:.2f}x the baseline (target: at most {TARGET}x)")
            if paused_base:
                to_paused[label] = med["total_s"] / paused_base
                print(f"  {label}: {to_paused[label]:.2f}x the baseline with its collector paused")
    if failed:
        print(f"  FAILED runs: {len(failed)} (listed in the JSON)")
    summary = {"model": args.model, "repeat": args.repeat, "drop": not args.no_drop,
               "imports_s": {k: statistics.median(v) for k, v in imports.items()},
               "medians": medians, "ratio_to_baseline": ratios, "ratio_to_gc_paused_baseline": to_paused,
               "target": TARGET,
               "meets_target": {k: v <= TARGET for k, v in ratios.items()}, "failed": len(failed)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**where, "summary": summary, "runs": runs, "failed_runs": failed}, indent=2))
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
