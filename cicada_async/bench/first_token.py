"""``cicada bench first-token``: the cold time to first token of an LLM, served, against its
peers on the same weights and the same clock, and against its bound (issue 26).

    flock /tmp/cicada-bench.lock cicada bench first-token --models llama-small --prompts 32 \\
        --bursts 1 --storage local --repeat 3 --converter <sdist>/vendor/llama.cpp
    (<sdist>: llama-cpp-python 0.3.36's sdist, unpacked; docs/benchmarks-first-token.md)

A cell is (model, prompt tokens, burst, storage): ``--models`` x ``--prompts`` x ``--bursts`` x
``--storage``, or an explicit ``--cells llama-1b:512:8:local,...``. Models are catalogue LMs made
by ``make-model`` (fp32) into ``--dir``; the prompt is English text cut to exactly the prompt
length in the model's tokenizer; ``--max-tokens`` (4) are generated, greedy, ``ignore_eos``.
A burst of B sends B such requests together, each on its own connection.

Peers (``--peers``; each runs where it applies, interleaved per repetition in a rotating
order, every one a fresh process with its weights evicted and checked; ``first_token_runs``):
``cicada`` (request -> first token of a cold model in a running ``cicada serve``),
``cicada-spawn`` (spawn of ``cicada serve`` -> first token), ``floor`` (spawn -> imports + one
warm prefill, local cells), ``transformers`` and ``llama.cpp`` (local cells: llama-cpp-python's
server on a GGUF converted at f32 from the same safetensors by ``--converter``, mapped from the
same disk), ``download-then-load`` and ``tensorizer`` (remote cells). Remote storage is nginx
(``http``) or s3rver (``s3``) in a network namespace behind a veth pair shaped by tc to
``--rate-mbit`` (1000) Mbit/s (``netns.ShapedLink``); origins' files are dropped from the page
cache before every run.

The bound (``first_token_bound``), measured once per model in the same run: skeleton + max(disk
or wire read, warm prefill of the cell's batch) + one decode step. The report
(``first_token_report``): median time to first token per peer, ratios to the best peer and
the bound, spawn -> first token beside the import floor, cicada's decode steps from step 2 on
against its warm reference (the same burst again, same server, once warm), peak RSS against
weights + KV cache + the server's idle RSS before the request, GB-seconds per first token, and
with ``--plot DIR`` cicada's pipeline timeline per cell (the served cold start's).
The JSON (``--json``, written after every cell) holds every run, command, commit and machine.
An estimate of the run time is printed first; ``--estimate`` prints it and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cicada_async.bench.first_token_bound import bound_of, local_read_s, measure
from cicada_async.bench.first_token_report import cell_summary, format_table, plot_timelines
from cicada_async.bench.first_token_runs import Setup, run_peer
from cicada_async.bench.origins import S3_DATA
from cicada_async.bench.procinfo import commit, machine

LOCAL_PEERS = ("cicada", "cicada-spawn", "floor", "transformers", "llama.cpp")
REMOTE_PEERS = ("cicada", "cicada-spawn", "download-then-load", "tensorizer")
ALL_PEERS = ("cicada", "cicada-spawn", "floor", "transformers", "llama.cpp", "download-then-load", "tensorizer")
GUESS_BYTES = {"llama-small": 352_000_000, "llama-1b": 4_030_000_000}  # fp32 safetensors, for the estimate
FLOPS = 1.0e11  # what two cores did on llama-1b: 512 tokens in about 10 s
Cell = tuple[str, int, int, str]


def parse_cells(args: argparse.Namespace) -> list[Cell]:
    if args.cells:
        out = []
        for c in args.cells.split(","):
            m, n, b, s = c.strip().split(":")
            out.append((m, int(n), int(b), s))
    else:
        out = [(m, int(n), int(b), s) for s in _list(args.storage) for m in _list(args.models)
               for n in _list(args.prompts) for b in _list(args.bursts)]
    bad = {c[3] for c in out} - {"local", "http", "s3"}
    if bad:
        raise SystemExit(f"unknown storage {sorted(bad)} (local, http, s3)")
    return out


def _list(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def peers_of(cell: Cell, wanted: list[str]) -> list[str]:
    fits = LOCAL_PEERS if cell[3] == "local" else REMOTE_PEERS
    return [p for p in wanted if p in fits]


def _bytes(model: str, root: Path) -> int:
    files = list((root / model).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else GUESS_BYTES.get(model, 400_000_000)


def estimate(cells: list[Cell], peers: list[str], args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """Seconds, by a rough model of this 2-core machine: 5 s of imports per fresh process,
    10 s for a serve to come up and settle, disk 1.5 GB/s, the link at its rate, prefill at
    1e11 FLOP/s, a decode step at 8 GB/s of weights; the bound, the priming start and the
    set-up (model, GGUF, upload) once per model. Smoke runs on the shared machine took 1.5-4x
    it when other work shared the cores."""
    per: dict[str, float] = {}
    for cell in cells:
        m, n, b, s = cell
        nbytes = _bytes(m, args.dir)
        params = nbytes / 4
        read = nbytes / 1.5e9 if s == "local" else nbytes * 8 / (args.rate_mbit * 1e6)
        prefill, prefill1 = 2 * params * n * b / FLOPS, 2 * params * n / FLOPS
        decode = args.max_tokens * nbytes / 8e9
        warm_ref = prefill + decode  # cicada's warm decode reference: the burst again, once warm
        one = {"cicada": 10 + max(read, prefill) + decode + warm_ref, "cicada-spawn": 7 + max(read, prefill) + decode,
               "floor": 5 + prefill, "transformers": 6 + read + prefill + decode,
               "llama.cpp": 3 + read + b * (prefill1 + decode), "download-then-load": 6 + read + prefill + decode,
               "tensorizer": 6 + read + prefill + decode}
        per[":".join(map(str, cell))] = args.repeat * sum(one[p] for p in peers_of(cell, peers))
    for m in {c[0] for c in cells}:
        nbytes = _bytes(m, args.dir)
        shapes = {(c[1], c[2]) for c in cells if c[0] == m}
        pf = [2 * nbytes / 4 * n * b / FLOPS for n, b in shapes]
        prefills = sum(p * (5 if p < 2 else 2 if p < 10 else 1) for p in pf)  # first_token_bound's repeats
        setup = 0.0 if (args.dir / m / "config.json").exists() else nbytes / 0.2e9
        if "llama.cpp" in peers and any(c[3] == "local" for c in cells if c[0] == m):
            setup += nbytes / 0.2e9  # GGUF conversion, once (kept beside the model)
        if any(c[3] == "s3" for c in cells if c[0] == m):
            setup += nbytes / 0.1e9  # upload and read-back
        prime = 10 + nbytes / 1.5e9 * (1 + sum(c[3] != "local" for c in cells if c[0] == m))
        per[f"{m}: bound + set-up"] = 5 + 4 * nbytes / 1.5e9 + prefills + setup + prime
    return sum(per.values()), per


def prompt_of(model_dir: Path, n: int, count: int = 1) -> tuple[list[str], int]:
    """``count`` different English texts that the model's tokenizer cuts into exactly ``n``
    tokens each (without the special tokens it adds); returns them and the count with them (what
    a server sees). A burst sends different prompts: identical ones would let a server that
    caches prompt prefixes (llama.cpp's does) prefill one and reuse it for the rest."""
    from tokenizers import Tokenizer

    from cicada_async.bench.generate import prompt_text

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    words = prompt_text(8 * n + 64 * count + 256).split()

    def count_of(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    found: list[str] = []
    for start in range(0, 64 * count + 64):  # whole words from some word on, the runs that land on n
        k = 1
        while start + k <= len(words) and (got := count_of(" ".join(words[start:start + k]))) < n:
            k += max(1, (n - got) // 4)
        text = " ".join(words[start:start + k])
        if count_of(text) == n and text not in found:
            found.append(text)
            if len(found) == count:
                return found, len(tok.encode(text, add_special_tokens=True).ids)
    raise RuntimeError(f"no {count} different prompts of exactly {n} tokens")


def _ensure_model(name: str, root: Path) -> Path:
    d = root / name
    if not (d / "tokenizer.json").exists():
        from cicada_async.models.catalogue import make_model

        print(f"making {name} (fp32) in {d} ...", flush=True)
        make_model(name, d)
    return d


def _origins(stack: ExitStack, tmp: Path, dirs: dict[str, Path], kinds: set[str], tensorizer: bool,
             rate_bps: float) -> tuple[Any, dict[str, str], dict[str, Any], Path]:
    """The shaped link, the origin tree (links to the model files, and model.tensors when the
    tensorizer peer runs), nginx and the S3 server (origins.start_s3) in its namespace, the models uploaded."""
    from cicada_async.bench.netns import ShapedLink, available
    from cicada_async.bench.origins import model_files, start_http_origin, start_s3, upload_s3

    why = available()
    if why:
        raise SystemExit(f"remote storage needs a kernel-shaped link: {why}")
    link = stack.enter_context(ShapedLink())
    origin = tmp / "origin"
    for name, d in dirs.items():
        if tensorizer:
            from cicada_async.bench.remote import _origin_dir

            _origin_dir(origin, name, d)
        else:
            (origin / name).mkdir(parents=True)
            for f in model_files(d):
                (origin / name / f.name).symlink_to(f.resolve())
    endpoints: dict[str, str] = {}
    storage: dict[str, Any] = {}
    if "http" in kinds:
        (tmp / "nginx").mkdir()
        endpoints["http"], _ = start_http_origin(origin, tmp / "nginx", stack, link)
        storage["http"] = {}
    if "s3" in kinds:
        endpoints["s3"], server, creds = start_s3(tmp, stack, link)
        print(f"uploading {', '.join(dirs)} to {server} ...", flush=True)
        upload_s3(endpoints["s3"], creds, {n: origin / n for n in dirs})
        storage["s3"] = {"endpoint_url": endpoints["s3"], "region": "us-east-1", "addressing_style": "path", **creds}
    link.set_rate(rate_bps)
    return link, endpoints, storage, origin


def _prime(setup: Setup, link: Any, rate_bps: float) -> dict[str, Any]:
    """One untimed cold start of a short request, the link unshaped: the server writes the
    model's plan file (its later cold starts skip the dry forward, as in production)."""
    from dataclasses import replace

    if link is not None:
        link.set_rate(None)
    t0 = time.time()
    try:
        run_peer("cicada", replace(setup, burst=1, max_tokens=1, timelines=None))
        return {"s": time.time() - t0}
    except Exception as e:  # noqa: BLE001 - the timed runs will show it too
        return {"s": time.time() - t0, "error": f"{type(e).__name__}: {e}"}
    finally:
        if link is not None:
            link.set_rate(rate_bps)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="cicada bench first-token", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-small,llama-1b")
    ap.add_argument("--prompts", default="32,512", help="prompt lengths in tokens")
    ap.add_argument("--bursts", default="1,8", help="requests sent together")
    ap.add_argument("--storage", default="local", help="local,http,s3")
    ap.add_argument("--cells", default="", help="MODEL:TOKENS:BURST:STORAGE,... instead of the four lists")
    ap.add_argument("--peers", default=",".join(ALL_PEERS), help="each runs in the cells it applies to")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="the shaped link's rate for http and s3")
    ap.add_argument("--dir", type=Path, default=Path("models"), help="where catalogue models are made")
    ap.add_argument("--converter", type=Path, default=None,
                    help="llama.cpp's source (vendor/llama.cpp of the llama-cpp-python sdist) for the GGUF")
    ap.add_argument("--prefetch", choices=["on", "off"], default=None,
                    help="CICADA_PREFETCH for cicada-spawn (default: the server's own default)")
    ap.add_argument("--plot", type=Path, default=None, help="a directory for cicada's timeline per cell (PNG)")
    ap.add_argument("--no-bound", action="store_true", help="skip the bound (smoke runs)")
    ap.add_argument("--no-prime", action="store_true",
                    help="no untimed cold start per model and storage first (it writes the plan file, unshaped)")
    ap.add_argument("--estimate", action="store_true", help="print the estimated run time and exit")
    ap.add_argument("--json", type=Path, default=Path("bench-results/first-token.json"))
    args = ap.parse_args(argv)

    cells = parse_cells(args)
    wanted = _list(args.peers)
    unknown = set(wanted) - set(ALL_PEERS)
    if unknown:
        raise SystemExit(f"--peers: unknown {sorted(unknown)} ({', '.join(ALL_PEERS)})")
    total, per = estimate(cells, wanted, args)
    print(f"estimated run time: {total / 60:.1f} min ({len(cells)} cells x {args.repeat} repetitions)", flush=True)
    for k, v in per.items():
        print(f"  {k:40s} {v / 60:6.1f} min", flush=True)
    if args.estimate:
        return 0
    if "llama.cpp" in wanted:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: the llama.cpp peer is skipped", flush=True)
            wanted.remove("llama.cpp")
    doc: dict[str, Any] = {
        "command": " ".join(["cicada bench first-token", *argv]), **commit(), "machine": machine(),
        "repeat": args.repeat, "max_tokens": args.max_tokens, "rate_mbit": args.rate_mbit, "dtype": "float32",
        "estimate_s": total, "clock": "request sent (go, for workers) -> first token received; see first_token_runs",
        "cells": [], "bounds": {}, "primed": [], "failed_runs": [],
    }
    # SIGTERM unwinds like Ctrl-C: the servers stop and the namespace goes (restored after).
    stack = ExitStack()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stack.callback(signal.signal, signal.SIGTERM, previous)
    t_start = time.time()
    with stack, tempfile.TemporaryDirectory(prefix="cicada-bench-ft-") as tmpd:
        tmp = Path(tmpd)
        os.chmod(tmp, 0o755)
        dirs = {m: _ensure_model(m, args.dir) for m in sorted({c[0] for c in cells})}
        ggufs: dict[str, Path] = {}
        if "llama.cpp" in wanted and any(c[3] == "local" for c in cells):
            from cicada_async.bench.generate import convert_gguf

            if args.converter is None:
                raise SystemExit("the llama.cpp peer needs --converter (or leave it out of --peers)")
            for m, d in dirs.items():
                ggufs[m] = d.parent / f"{m}.f32.gguf"
                print(f"GGUF of {m} (f32) ...", flush=True)
                convert_gguf(args.converter, d, ggufs[m])
        kinds = {c[3] for c in cells} - {"local"}
        remote: tuple[Any, dict[str, str], dict[str, Any], Path] | None = None
        if kinds:
            need_tz = "tensorizer" in wanted
            remote = _origins(stack, tmp, dirs, kinds, need_tz, args.rate_mbit * 1e6)
        for m, d in dirs.items():
            if args.no_bound:
                continue
            shapes = sorted({(n, b) for mm, n, b, _ in cells if mm == m})
            exact = [(prompt_of(d, n)[1], b) for n, b in shapes]
            print(f"bound of {m}: shapes {exact} ...", flush=True)
            doc["bounds"][m] = {"parts": measure(d, exact, read=any(c[3] == "local" for c in cells if c[0] == m))}
        primed: set[tuple[str, str]] = set()
        for cell in cells:
            m, n, b, kind = cell
            d = dirs[m]
            key = f"{m}/{n}tok/x{b}/{kind}"
            texts, seen = prompt_of(d, n, b)
            files = [d]
            uri, storage = str(d.resolve()), {}
            if remote is not None and kind != "local":
                _, endpoints, settings, origin = remote
                uri = f"s3://cicada-bench/{m}" if kind == "s3" else f"{endpoints['http']}/{m}/"
                storage = {kind: settings[kind]}
                files = [d, origin / m] + ([tmp / S3_DATA] if kind == "s3" and (tmp / S3_DATA).exists() else [])
            setup = Setup(name=m, model_dir=d, uri=uri, storage=storage, prompts=texts, prompt_tokens=seen, burst=b,
                          max_tokens=args.max_tokens, evict=files, prefetch=args.prefetch)
            peers = peers_of(cell, wanted)
            runs: dict[str, list[dict[str, Any]]] = {p: [] for p in peers}
            if "cicada" in peers and (m, kind) not in primed and not args.no_prime:
                primed.add((m, kind))
                doc["primed"].append({"cell": key, **_prime(setup, remote[0] if remote and kind != "local" else None,
                                                            args.rate_mbit * 1e6)})
            for rep in range(args.repeat):
                order = peers[rep % len(peers):] + peers[: rep % len(peers)]
                for peer in order:
                    setup.gguf = ggufs.get(m) if kind == "local" else None
                    plot = args.plot is not None and peer == "cicada" and rep == args.repeat - 1
                    setup.timelines = tmp / f"timelines-{key.replace('/', '_')}.json" if plot else None
                    try:
                        r = run_peer(peer, setup)
                    except Exception as e:  # noqa: BLE001 - counted, listed, and the exit status says so
                        r = {"peer": peer, "error": f"{type(e).__name__}: {e}"}
                        doc["failed_runs"].append({"cell": key, "rep": rep, **r})
                    r["rep"] = rep
                    runs[peer].append(r)
                    shown = r["error"][:160] if "error" in r else "  ".join(
                        f"{label} {r[k] * 1e3:8.0f} ms" for k, label in
                        (("ttft_last_s", "first token"), ("spawn_to_first_s", "spawn to first token")) if k in r)
                    print(f"  {key:32s} {peer:19s} rep {rep + 1}: {shown}", flush=True)
                    if plot and "timelines_json" in r and args.plot is not None:
                        args.plot.mkdir(parents=True, exist_ok=True)
                        png = args.plot / f"first-token-{key.replace('/', '_')}.png"
                        try:
                            plot_timelines(Path(r["timelines_json"]), png, f"{key} cold first token")
                            r["plot"] = str(png)
                        except Exception as e:  # noqa: BLE001 - a chart must not lose the figures
                            print(f"  (no chart: {e})", flush=True)
            bound = None
            if m in doc["bounds"]:
                parts = doc["bounds"][m]["parts"]
                read = local_read_s(parts, runs) if kind == "local" else \
                    sum(f.stat().st_size for f in d.iterdir() if f.is_file()) * 8 / (args.rate_mbit * 1e6)
                bound = bound_of(parts, seen, b, read)
            config = json.loads((d / "config.json").read_text())
            weights = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            summary = cell_summary({"key": key, "model": m, "prompt_tokens": n, "prompt_tokens_seen": seen, "burst": b,
                                    "storage": kind}, runs, bound, weights, config, args.max_tokens)
            summary["runs"] = runs
            doc["cells"].append(summary)
            doc["elapsed_s"] = time.time() - t_start
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2))
    print(format_table(doc["cells"]))
    print(f"\nelapsed {(time.time() - t_start) / 60:.1f} min (estimated {total / 60:.1f}); JSON: {args.json}")
    below = [c["key"] for c in doc["cells"] if c["below_bound"]]
    if below:
        print(f"FAILED: cicada's median is below its bound in {below}: the bench or the bound is wrong")
    if doc["failed_runs"]:
        print(f"FAILED runs: {len(doc['failed_runs'])} (listed in the JSON)")
    return 1 if below or doc["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
