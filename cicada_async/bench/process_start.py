"""Process cold start: from spawning ``cicada serve`` to the first answer of an infer request.

    python -m cicada_async.bench.process_start --model gpt2-medium --repeat 3

Each repetition drops the weights from the page cache, spawns a fresh ``cicada serve`` (its
config names just this model), polls ``/v2/health/live`` until it answers, sends one infer
request and waits for the answer. The time is split into:

- ``to_start_log``: spawn to the server's ``"event": "start"`` log line: interpreter start,
  imports (torch, aiohttp, the server's modules) and config;
- ``start_to_live``: the app and engine set up, the socket listening, the first live answer;
- ``first_response``: the infer request sent to its answer; within it ``cold_start`` (the
  server's ``"event": "cold_start"`` log line, load start to weights resident; it includes the
  transformers import when nothing imported it before) and the rest (request decoding, queueing,
  the forward's tail, encoding).

Import costs are also measured on their own in the same run, each in a fresh interpreter:
``python -c pass``, ``import cicada_async.service.server``, and transformers with the model's class
on top of torch. After the first answer the model is unloaded, its pages dropped again and the
same request sent: that second cold response, in a process whose imports are done, is the
model's own cost; ``process_overhead`` is the total minus it.

``--warm-imports both`` runs every repetition with the engine's import of transformers on its
idle executor thread at start (``Engine(warm_imports=True)``, what ``cicada serve`` does) and
without it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cicada_async.bench.cold_start import drop_page_cache


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


def one_run(model: str, model_dir: Path, *, warm_imports: bool, drop: bool, poll_s: float = 0.005) -> dict[str, Any]:
    if drop:
        drop_page_cache(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cicada.toml"
        cfg.write_text(f'[models.{json.dumps(model)}]\nuri = {json.dumps(str(model_dir.resolve()))}\n')
        port = free_port()
        env = dict(os.environ, PORT=str(port))
        body = example_request(model_dir)
        if warm_imports:
            cmd = [sys.executable, "-m", "cicada_async", "serve", "--config", str(cfg)]
        else:
            cmd = [sys.executable, "-c", _NO_WARM_IMPORTS, "--config", str(cfg)]
        t_spawn = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
                drop_page_cache(model_dir)
            t_req2 = time.time()
            status, out = _http(port, "POST", f"/v2/models/{model}/infer", body)
            t_answer2 = time.time()
            if status != 200:
                raise RuntimeError(f"second infer answered {status}: {out[:300]!r}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            reader.join(5)
    assert start is not None and cold is not None, "server logged no start/cold_start line"
    cold_s = float(cold["wall_s"])
    r = {
        "warm_imports": warm_imports,
        "total_s": t_answer - t_spawn,
        "to_start_log_s": float(start["ts"]) - t_spawn,
        "start_to_live_s": t_live - float(start["ts"]),
        "spawn_to_live_s": t_live - t_spawn,
        "first_response_s": t_answer - t_live,
        "cold_start_s": cold_s,
        "rest_of_response_s": (t_answer - t_live) - cold_s,
        "ttfc_s": (cold.get("timeline") or {}).get("time_to_first_compute_s"),
        # the model's own cold first response, measured in the warm process
        "model_cold_response_s": t_answer2 - t_req2,
    }
    # Everything the process adds on top of the model's own cold start.
    r["process_overhead_s"] = r["total_s"] - r["model_cold_response_s"]
    return r


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:7.0f}"


KEYS = ["total_s", "to_start_log_s", "start_to_live_s", "first_response_s", "cold_start_s",
        "rest_of_response_s", "model_cold_response_s", "process_overhead_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cicada_async.bench.process_start", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-medium", help="catalogue name (made with make-model if missing)")
    ap.add_argument("--dir", type=Path, default=Path("models"), help="where catalogue models live")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warm-imports", dest="warm_imports", choices=["on", "off", "both"], default="both",
                    help="the engine's import of transformers on its idle thread at start (Engine(warm_imports))")
    ap.add_argument("--no-drop", action="store_true", help="keep the weights in the page cache")
    ap.add_argument("--json", type=Path, default=Path("bench-results/process-start.json"))
    args = ap.parse_args(argv)

    model_dir = args.dir / args.model
    if not (model_dir / "config.json").exists():
        from cicada_async.models.catalogue import make_model

        print(f"making {args.model} with random weights in {model_dir} ...", flush=True)
        make_model(args.model, model_dir)

    arch = _architecture(model_dir)
    # Imports on their own, fresh interpreters, this run's conditions (warm package files).
    imports: dict[str, list[float]] = {"python -c pass": [], "import cicada_async.service.server": [],
                                       "import torch": [], "import torch + transformers class": []}
    hf = f"import torch, transformers; transformers.{arch}" if arch else "import torch, transformers"
    for _ in range(args.repeat):
        imports["python -c pass"].append(time_python("pass"))
        imports["import torch"].append(time_python("import torch"))
        imports["import cicada_async.service.server"].append(time_python("import cicada_async.service.server"))
        imports["import torch + transformers class"].append(time_python(hf))

    modes = {"on": [True], "off": [False], "both": [False, True]}[args.warm_imports]
    runs: list[dict[str, Any]] = []
    for i in range(args.repeat):
        for pw in modes:  # interleaved, so drift hits both modes alike
            r = one_run(args.model, model_dir, warm_imports=pw, drop=not args.no_drop)
            r["rep"] = i
            runs.append(r)
            print(f"rep {i} warm-imports={'on ' if pw else 'off'} " + "  ".join(f"{k[:-2]} {_fmt(r[k])}" for k in KEYS)
                  + " ms", flush=True)

    print(f"\n{args.model}: medians of {args.repeat} (ms), page cache {'warm' if args.no_drop else 'dropped'} for the weights")
    print("  imports, each in a fresh interpreter:")
    for k, v in imports.items():
        print(f"    {k:40s} {statistics.median(v) * 1e3:7.0f}")
    summary: dict[str, Any] = {"model": args.model, "repeat": args.repeat, "drop": not args.no_drop,
                               "imports_s": {k: statistics.median(v) for k, v in imports.items()}, "modes": {}}
    for pw in modes:
        sel = [r for r in runs if r["warm_imports"] == pw]
        med = {k: statistics.median([r[k] for r in sel if r[k] is not None]) if any(r[k] is not None for r in sel)
               else None for k in KEYS}
        summary["modes"]["warm-imports" if pw else "no-warm-imports"] = med
        setup = med["to_start_log_s"] + med["start_to_live_s"]
        over = med["process_overhead_s"]
        print(f"  warm imports {'on ' if pw else 'off'}: " + "  ".join(f"{k[:-2]} {_fmt(med[k])}" for k in KEYS))
        print(f"      spawn to live {setup * 1e3:.0f} ms; process overhead (total - model's own cold response) "
              f"{over * 1e3:.0f} ms = {100 * over / med['model_cold_response_s']:.0f}% of the model's cold response, "
              f"{100 * over / med['total_s']:.0f}% of the total")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
