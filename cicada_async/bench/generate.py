"""Warm text generation side by side: cicada's OpenAI route, transformers' ``generate`` and
llama.cpp's server (llama-cpp-python), on the same weights, the same prompt and the same cores.

Usage (one benchmark at a time, on a quiet machine)::

    python -m cicada_async.bench.generate --model llama-small --repeat 3 \\
        --json bench-results/generate.json

What each strategy is, and what is timed:
- **transformers**: a fresh process loads the directory (``from_pretrained``, fp32), generates
  once to warm up, then per run ``generate(do_sample=False, min_new_tokens=N,
  max_new_tokens=N)`` with a streamer that stamps every token. Time to first token is the call
  to the first new token; decode speed is (N - 1) / (last token - first token). No server, no
  HTTP: the floor a user's own script gets.
- **cicada**: a fresh ``cicada serve`` with the model; the model is cold-started and warmed by
  two requests, then each run is a streamed ``POST /v1/completions`` (``temperature: 0``,
  ``ignore_eos``) from this process: request sent to the first chunk, and chunk stamps for the
  decode speed. At concurrency 8, eight such streams at once; the aggregate is completion tokens
  over first send to last chunk.
- **cicada-engine**: the same engine without the HTTP front end, in a fresh process:
  ``ModelInstance.generate`` timed as transformers is (call to first token, token stamps), alone
  and 8 at once. On two cores the served path's HTTP server, SSE and the bench's client share
  the cores with the forward; this row shows what the engine itself does.
- **llama.cpp**: ``python -m llama_cpp.server`` (llama-cpp-python, built from its PyPI sdist:
  no prebuilt wheel reaches these machines) on a GGUF converted from the same safetensors at the
  same precision (``--outtype f32``) with the converter vendored in that sdist
  (``--converter``), the same client and clock as cicada. Our tokenizer is a locally trained
  byte-level BPE with GPT-2's pre-tokenizer, which the converter cannot recognise by hash: the
  wrapper below names it ``gpt2`` explicitly, and the prompt token counts of both servers are
  recorded (``usage.prompt_tokens``) so a tokenization difference would show. llama.cpp runs
  one request at a time per model (its server's locks), so its concurrency-8 figure is what a
  user of that server gets.

Every strategy computes on every usable core (torch threads = cores; llama.cpp ``n_threads`` =
``n_threads_batch`` = cores). The JSON holds every run, the medians, the ratios and command,
commit and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from cicada_async.bench.origins import stop_process
from cicada_async.bench.procinfo import commit, machine
from cicada_async.engine.procfs import usable_cores

_TRANSFORMERS = r"""
import json, sys, time
import torch, transformers
from transformers.generation.streamers import BaseStreamer
model_dir, prompt, n, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = tok(prompt, return_tensors="pt").input_ids

class Stamps(BaseStreamer):
    def __init__(self):
        self.t, self.first = [], True
    def put(self, value):
        if self.first:  # the prompt comes first
            self.first = False
            return
        self.t.append(time.perf_counter())
    def end(self):
        pass

def one(k):
    s = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=k,
                             max_new_tokens=k, use_cache=True, streamer=s, pad_token_id=tok.eos_token_id)
    return {"ttft_s": s.t[0] - t0, "tokens": out.shape[1] - ids.shape[1],
            "decode_tok_s": (len(s.t) - 1) / (s.t[-1] - s.t[0]) if len(s.t) > 1 else None}

one(min(n, 8))  # warm-up
runs = [one(n) for _ in range(repeat)]
print(json.dumps({"prompt_tokens": ids.shape[1], "threads": torch.get_num_threads(), "runs": runs}))
"""

# cicada's engine without the HTTP front end, in a fresh process: the same timing as
# transformers' (call to first token, token stamps), so that the served path's cost on these
# two cores (the HTTP server, SSE and this client share them with the forward) shows apart.
_ENGINE = r"""
import asyncio, json, sys, time
from cicada_async.engine.runtime import Engine
from protocols.generation import SamplingParams
from protocols.serving import ModelOptions, Priority
model_dir, prompt, n, repeat, conc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

async def one(inst, ids, k):
    stamps, t0 = [], time.perf_counter()
    async for d in inst.generate(ids, SamplingParams(max_tokens=k, temperature=0, ignore_eos=True),
                                 priority=Priority.DEFAULT):
        stamps += [time.perf_counter()] * len(d.token_ids)
    return {"t0": t0, "t_end": stamps[-1], "ttft_s": stamps[0] - t0, "tokens": len(stamps),
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None}

async def main():
    async with Engine() as eng:
        inst = eng.instance("m", model_dir, ModelOptions(dtype="float32", max_sequences=max(conc, 1)))
        ids = (await inst.prompt_codec()).encode(prompt)
        await one(inst, ids, 8)
        await one(inst, ids, 8)
        single = [await one(inst, ids, n) for _ in range(repeat)]
        burst = []
        for _ in range(repeat):
            runs = await asyncio.gather(*(one(inst, ids, n) for _ in range(conc)))
            start, end = min(r["t0"] for r in runs), max(r["t_end"] for r in runs)
            burst.append({"aggregate_tok_s": sum(r["tokens"] for r in runs) / (end - start),
                          "ttft_s": [r["ttft_s"] for r in runs], "tokens": [r["tokens"] for r in runs]})
    print(json.dumps({"prompt_tokens": len(ids), "single": single, "concurrent": burst}))

asyncio.run(main())
"""

# Converts with the sdist's own converter; only the BPE pre-tokenizer's name is given, since
# its hash table knows published tokenizers only (see the module docstring), and its Llama path
# tries SentencePiece first (which fails on a missing module, not a missing file, here).
_CONVERT = r"""
import runpy, sys
src = sys.argv[1]
sys.path.insert(0, src)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
def _no_sentencepiece(self):  # no tokenizer.model here: the Llama path goes on to the BPE one
    raise FileNotFoundError("no SentencePiece model")
base.TextModel._set_vocab_sentencepiece = _no_sentencepiece
base.TextModel._set_vocab_llama_hf = _no_sentencepiece
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompt_text(n_tokens: int) -> str:
    """English text from Python's own help topics, about ``n_tokens`` BPE tokens long (each
    server reports the exact count it saw)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    return " ".join(text.split())[: n_tokens * 4]


async def _wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with s.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"server on {port} not up after {timeout_s} s")


def stream_once(port: int, model: str, prompt: str, max_tokens: int, *, keep_stamps: bool = False) -> dict[str, Any]:
    """One streamed completion: seconds to the first token, chunk stamps, the usage counts
    (with ``keep_stamps``, every chunk's perf_counter at arrival as ``stamps``).

    A lean blocking client (http.client, one thread per stream, a prefix test per line and
    JSON parsed only for the usage and error events): on two cores the client shares the CPU
    with the server's torch threads, and an aiohttp client that parsed every chunk measured its
    own cost (cicada serve decoded 14.5 tok/s under it, 21.9 under this one)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    stamps: list[float] = []
    usage: dict[str, Any] | None = None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        for line in r:
            if not line.startswith(b"data:"):
                continue
            if line.startswith(b"data: [DONE]"):
                break
            if b'"text"' in line:  # a completion chunk (the usage chunk has no choice); any spacing
                stamps.append(time.perf_counter())
            if b'"completion_tokens"' in line or b'"error"' in line:
                doc = json.loads(line[5:])
                if "error" in doc:
                    raise RuntimeError(f"stream error: {doc['error']}")
                usage = doc["usage"]
        t_end = time.perf_counter()
    finally:
        conn.close()
    tokens = int(usage["completion_tokens"]) if usage else len(stamps)
    return {"t0": t0, "t_end": t_end, "ttft_s": stamps[0] - t0 if stamps else None, "chunks": len(stamps),
            "tokens": tokens, "prompt_tokens": int(usage["prompt_tokens"]) if usage else None,
            **({"stamps": stamps} if keep_stamps else {}),
            "decode_tok_s": (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and tokens > 1 else None}


def measure_server(port: int, model: str, prompt: str, max_tokens: int, repeat: int,
                   concurrency: int) -> dict[str, Any]:
    for _ in range(2):  # the cold start, then one warm request: both outside the clock
        stream_once(port, model, prompt, 8)
    single = [stream_once(port, model, prompt, max_tokens) for _ in range(repeat)]
    burst = []
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for _ in range(repeat):
            runs = list(pool.map(lambda _: stream_once(port, model, prompt, max_tokens), range(concurrency)))
            start, end = min(r["t0"] for r in runs), max(r["t_end"] for r in runs)
            burst.append({"aggregate_tok_s": sum(r["tokens"] for r in runs) / (end - start),
                          "ttft_s": [r["ttft_s"] for r in runs], "tokens": [r["tokens"] for r in runs]})
    return {"single": single, "concurrent": burst}


def run_transformers(model_dir: Path, prompt: str, n: int, repeat: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _TRANSFORMERS, str(model_dir), prompt, str(n), str(repeat),
                          str(usable_cores())], check=True, capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def run_engine(model_dir: Path, prompt: str, n: int, repeat: int, concurrency: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _ENGINE, str(model_dir.resolve()), prompt, str(n), str(repeat),
                          str(concurrency)], check=True, capture_output=True, text=True)
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def run_cicada(model: str, model_dir: Path, prompt: str, n: int, repeat: int, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cicada.toml"
        cfg.write_text(f'[models.{json.dumps(model)}]\nuri = {json.dumps(str(model_dir.resolve()))}\n'
                       f'max_sequences = {max(concurrency, 1)}\n')
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "cicada_async", "serve", "--config", str(cfg)],
                                env=dict(os.environ, PORT=str(port)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_wait_http(port, "/v2/health/live", proc, 120))
            return measure_server(port, model, prompt, n, repeat, concurrency)
        finally:
            stop_process(proc)


def convert_gguf(converter: Path, model_dir: Path, out: Path) -> None:
    if out.exists() and out.stat().st_mtime >= max(f.stat().st_mtime for f in model_dir.iterdir()):
        return
    subprocess.run([sys.executable, "-c", _CONVERT, str(converter), str(model_dir), "--outfile", str(out),
                    "--outtype", "f32"], check=True, capture_output=True)


def run_llama_cpp(model: str, gguf: Path, prompt: str, n: int, repeat: int, concurrency: int) -> dict[str, Any]:
    port = free_port()
    cores = str(usable_cores())
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model,
                             "--host", "127.0.0.1", "--port", str(port), "--n_threads", cores,
                             "--n_threads_batch", cores, "--n_ctx", "2048", "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_wait_http(port, "/v1/models", proc, 120))
        return measure_server(port, model, prompt, n, repeat, concurrency)
    finally:
        stop_process(proc)


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    med: dict[str, dict[str, float | None]] = {}
    for name, r in results.items():
        if "error" in r:
            continue
        if name == "transformers":
            med[name] = {"ttft_s": _median([x["ttft_s"] for x in r["runs"]]),
                         "decode_tok_s": _median([x["decode_tok_s"] for x in r["runs"]])}
        else:
            med[name] = {"ttft_s": _median([x["ttft_s"] for x in r["single"]]),
                         "decode_tok_s": _median([x["decode_tok_s"] for x in r["single"]]),
                         "aggregate_tok_s_concurrent": _median([x["aggregate_tok_s"] for x in r["concurrent"]]),
                         "ttft_s_concurrent": _median([t for x in r["concurrent"] for t in x["ttft_s"]])}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    c, t, lc = med.get("cicada", {}), med.get("transformers", {}), med.get("llama.cpp", {})
    e = med.get("cicada-engine", {})
    ratios = {
        "engine_decode_tok_s_over_transformers": ratio(e.get("decode_tok_s"), t.get("decode_tok_s")),
        "engine_ttft_over_transformers": ratio(e.get("ttft_s"), t.get("ttft_s")),
        "engine_concurrent_aggregate_over_single": ratio(e.get("aggregate_tok_s_concurrent"), e.get("decode_tok_s")),
        "decode_tok_s_cicada_over_transformers": ratio(c.get("decode_tok_s"), t.get("decode_tok_s")),
        "ttft_cicada_over_transformers": ratio(c.get("ttft_s"), t.get("ttft_s")),
        "concurrent_aggregate_over_single_cicada": ratio(c.get("aggregate_tok_s_concurrent"), c.get("decode_tok_s")),
        "decode_tok_s_cicada_over_llama_cpp": ratio(c.get("decode_tok_s"), lc.get("decode_tok_s")),
        "ttft_cicada_over_llama_cpp": ratio(c.get("ttft_s"), lc.get("ttft_s")),
        "concurrent_aggregate_cicada_over_llama_cpp": ratio(c.get("aggregate_tok_s_concurrent"),
                                                           lc.get("aggregate_tok_s_concurrent")),
        "concurrent_ttft_cicada_over_llama_cpp": ratio(c.get("ttft_s_concurrent"), lc.get("ttft_s_concurrent")),
    }
    return {"medians": med, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cicada bench generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-small", help="catalogue name (made with make-model if missing)")
    ap.add_argument("--dir", type=Path, default=Path("models"))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--strategies", default="transformers,cicada-engine,cicada,llama.cpp")
    ap.add_argument("--converter", type=Path, default=None,
                    help="llama.cpp's source dir (vendor/llama.cpp of the llama-cpp-python sdist) for the GGUF conversion")
    ap.add_argument("--json", type=Path, default=Path("bench-results/generate.json"))
    args = ap.parse_args(argv)

    model_dir = args.dir / args.model
    if not (model_dir / "tokenizer.json").exists():
        from cicada_async.models.catalogue import make_model

        make_model(args.model, model_dir)
    prompt = prompt_text(args.prompt_tokens)
    doc: dict[str, Any] = {
        "command": " ".join([sys.executable, "-m", "cicada_async.bench.generate", *(argv or sys.argv[1:])]),
        "commit": commit(), "machine": machine(), "model": args.model, "dtype": "float32",
        "prompt_tokens_asked": args.prompt_tokens, "max_tokens": args.max_tokens,
        "concurrency": args.concurrency, "repeat": args.repeat, "results": {},
    }
    for name in args.strategies.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            if name == "transformers":
                r = run_transformers(model_dir, prompt, args.max_tokens, args.repeat)
            elif name == "cicada-engine":
                r = run_engine(model_dir, prompt, args.max_tokens, args.repeat, args.concurrency)
            elif name == "cicada":
                r = run_cicada(args.model, model_dir, prompt, args.max_tokens, args.repeat, args.concurrency)
            elif name == "llama.cpp":
                if args.converter is None:
                    raise RuntimeError("--converter (llama.cpp's source with convert_hf_to_gguf.py) not given")
                gguf = model_dir.parent / f"{args.model}.f32.gguf"
                convert_gguf(args.converter, model_dir, gguf)
                r = run_llama_cpp(args.model, gguf, prompt, args.max_tokens, args.repeat, args.concurrency)
            else:
                raise ValueError(f"unknown strategy {name}")
        except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", None)
            r = {"error": f"{type(e).__name__}: {e}", "stderr_tail": (detail or "")[-2000:] if isinstance(detail, str) else None}
        doc["results"][name] = r
        print(json.dumps(summarize({name: r})["medians"].get(name, r.get("error"))), file=sys.stderr, flush=True)
    doc.update(summarize(doc["results"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"medians": doc["medians"], "ratios": doc["ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
