"""One run of one peer in one cell of ``cicada bench first-token``: spawn, evict, send, time.

Every run is a fresh process whose weights are dropped from the page cache and checked with
mincore (``pagecache.evict_checked``: a run that could not be made cold raises, and is
counted as failed) right before the request is sent. The clock is the driver's wall clock:
request sent (or ``go``) -> the first token received, per request; a burst's requests are
released together by a barrier, each on its own connection (``generate.stream_once``: the
lean http.client streaming client, one thread per stream).

- ``cicada``: a fresh ``cicada serve`` (``CICADA_PREFETCH=0``) is started, waited for until it
  answers ``/v2/health/live`` and its process has been idle for 0.5 s (under 5% of a core, no
  thread runnable: its start-up work, transformers' warm import and the ready skeleton, is
  done), then the weights are
  evicted and the burst sent: a cold model in a process that is up, the state a peer's worker
  is in at ``go``.
- ``cicada-spawn`` (issue 26, Deliver 2): weights evicted, then ``cicada serve`` spawned and the
  burst sent the moment its port accepts; spawn -> first token (scale from zero).
- the go peers (``first_token_peers``): ``transformers``, ``download-then-load``,
  ``tensorizer``, and ``llama.cpp``, whose server loads at ``go`` and whose requests, sent at
  ``go``, wait for its port.
- ``floor``: spawn -> imports + one warm prefill (page cache warm), the import floor.

Memory: the process's VmRSS sampled every 10 ms (``procinfo.ChildRss``), over the run's clock
window: peak, and GB-seconds (peak x window, and the integral), per first token too. For
``cicada`` also the runtime baseline, the server's VmRSS once it is live and idle, before the
weights are evicted and the request sent (imports, the ready skeleton on meta: no weight yet),
and its VmHWM (the kernel's exact peak, which 10 ms samples can miss) right after the cold
request's last token: issue 26's "peak RSS <= weights + KV cache + runtime baseline + 10%".

Decode (``cicada``, ``llama.cpp``): every token's arrival (``first_token_stream``). ``cicada``
then measures its warm reference in the same process: once the server is idle again, the same
burst (same prompts, more tokens: ``first_token_stream.warm_tokens``) is sent to the now-warm
model, and its full-batch steps are the warm decoding that the cold request's steps from step 2
on are held against.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cicada_async.bench.first_token_stream import decode_record, stream_stamped, warm_tokens
from cicada_async.bench.generate import free_port
from cicada_async.bench.origins import stop_process
from cicada_async.bench.pagecache import evict_checked, warm
from cicada_async.bench.procinfo import ChildRss
from cicada_async.bench.process_start import _http, _LogReader
from cicada_async.engine.procfs import kib_field, usable_cores

READY_TIMEOUT_S = 120
RUN_TIMEOUT_S = 3600
IDLE_MAX_S = 90.0


@dataclass
class Setup:
    """What a run of one cell needs: the model, where it is served from, the prompt."""

    name: str
    model_dir: Path
    uri: str  # local directory, http(s):// or s3:// as cicada serve and the remote peers read it
    storage: dict[str, dict[str, Any]]  # Engine(storage=...) for a remote uri
    prompts: list[str]  # one per request of the burst, all of prompt_tokens tokens
    prompt_tokens: int
    burst: int
    max_tokens: int
    evict: list[Path]  # dropped and checked before every run (weights, origin data)
    gguf: Path | None = None
    prefetch: str | None = None  # CICADA_PREFETCH for cicada-spawn; None: the server's default
    timelines: Path | None = None  # with --plot: where cicada serve's timelines go
    extra: dict[str, Any] = field(default_factory=dict)


def _evict(paths: list[Path]) -> int:
    return sum(evict_checked(p) for p in paths)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of every thread


def runnable_threads(pid: int) -> int:
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            n += (task / "stat").read_text().rpartition(")")[2].split()[0] == "R"
        except OSError:
            pass
    return n


def wait_idle(pid: int, quiet_s: float = 0.5, max_s: float = 90.0, busy: float = 0.05) -> float:
    """Until the process used under ``busy`` of a core over ``quiet_s`` and no thread of it was
    runnable at any of the 20 ms samples in between (a process starved of the CPU by others is
    not idle, though it uses none); seconds waited."""
    hz = os.sysconf("SC_CLK_TCK")
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        a, running = cpu_ticks(pid), 0
        end = time.monotonic() + quiet_s
        while time.monotonic() < end:
            running += runnable_threads(pid)
            time.sleep(0.02)
        if not running and (cpu_ticks(pid) - a) / hz < busy * quiet_s:
            break
    return time.monotonic() - t0


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.002)
    raise RuntimeError(f"nothing listens on {port} after {timeout_s} s")


def release(port: int, setup: Setup, proc: subprocess.Popen[bytes] | None = None) -> list[dict[str, Any]]:
    """The burst, released together (after ``proc``'s port accepts, if given)."""
    n = setup.burst
    gate = threading.Barrier(n + 1)
    out: list[dict[str, Any]] = [{} for _ in range(n)]

    def one(i: int) -> None:
        try:
            gate.wait()
            out[i] = stream_stamped(port, setup.name, setup.prompts[i % len(setup.prompts)], setup.max_tokens)
        except Exception as e:  # noqa: BLE001 - reported in the run's record
            out[i] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        if proc is not None:
            _wait_port(port, proc)
    except BaseException:
        gate.abort()  # the waiting threads leave (BrokenBarrierError) instead of hanging
        raise
    gate.wait()
    for t in threads:
        t.join(RUN_TIMEOUT_S)
    errors = [r["error"] for r in out if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed: {errors[0]}")
    return out


def _record(peer: str, t_send: float, streams: list[dict[str, Any]], rss: ChildRss, resident: int,
            t_spawn: float | None = None, **extra: Any) -> dict[str, Any]:
    """Per-request first-token times: each from its own send (``sent_at``), else from ``t_send``
    (``go``); the memory over ``t_send`` (or the spawn) -> the last first token."""
    firsts = [r["first_at"] for r in streams]
    t_last = max(firsts)
    cost = rss.cost(t_send if t_spawn is None else t_spawn, t_last)
    before = [b for t, b in rss.samples if t <= t_send]
    r: dict[str, Any] = {
        "rss_at_send_bytes": before[-1] if before else None,
        "peer": peer, "ttft_s": [s["first_at"] - s.get("sent_at", t_send) for s in streams],
        "ttft_last_s": t_last - t_send,
        "prompt_tokens": [s.get("prompt_tokens") for s in streams],
        "decode_tok_s": [s.get("decode_tok_s") for s in streams],
        "resident_before_bytes": resident, "cost": cost,
        "gb_seconds_per_first_token": cost["gb_seconds"] / len(firsts) if cost["gb_seconds"] is not None else None,
        **extra,
    }
    if t_spawn is not None:
        r["spawn_to_first_s"] = t_last - t_spawn
    return r


def _wall(streams: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stream client's perf_counter stamps as wall-clock times (both clocks read together)."""
    shift = time.time() - time.perf_counter()
    return [{**s, "first_at": s["t0"] + s["ttft_s"] + shift, "sent_at": s["t0"] + shift} for s in streams]


def _serve_config(setup: Setup, tmp: Path) -> Path:
    lines = []
    for kind, settings in setup.storage.items():
        lines.append(f"[storage.{kind}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += [f"[models.{json.dumps(setup.name)}]", f"uri = {json.dumps(setup.uri)}",
              f"max_sequences = {max(8, setup.burst)}"]
    cfg = tmp / "cicada.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def run_cicada(setup: Setup, spawn: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cicada-ft-") as tmpd:
        tmp = Path(tmpd)
        cfg = _serve_config(setup, tmp)
        port = free_port()
        env = dict(os.environ, PORT=str(port))
        if not spawn:
            env["CICADA_PREFETCH"] = "0"
        elif setup.prefetch is not None:
            env["CICADA_PREFETCH"] = setup.prefetch
        tl_file = tmp / "timelines.json"
        if setup.timelines is not None:
            cmd = [sys.executable, "-m", "cicada_async.bench.first_token_peers", "serve", str(tl_file)]
        else:
            cmd = [sys.executable, "-m", "cicada_async", "serve"]
        cmd += ["--config", str(cfg)]
        resident = _evict(setup.evict) if spawn else 0
        t_spawn = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rss = ChildRss(proc.pid)
        reader = _LogReader(proc.stderr)
        reader.start()
        extra: dict[str, Any] = {}
        try:
            if spawn:
                streams = _wall(release(port, setup, proc))
            else:
                _wait_port(port, proc)
                while _http(port, "GET", "/v2/health/live", timeout=5)[0] != 200:
                    time.sleep(0.01)
                extra["idle_wait_s"] = wait_idle(proc.pid, max_s=IDLE_MAX_S)
                extra["idle"] = extra["idle_wait_s"] < IDLE_MAX_S  # False: sent while it was still busy
                extra.update(_memory(proc.pid, "rss_baseline_bytes", "hwm_at_baseline_bytes"))
                resident = _evict(setup.evict)
                streams = _wall(release(port, setup))
                extra.update(_memory(proc.pid, "rss_after_cold_bytes", "rss_hwm_bytes"))
            rss.stop()
            cold = reader.wait_event("cold_start", 30)
            extra["cold_start_log"] = cold
            extra["decode"] = decode_record(streams)
            if not spawn:
                extra["warm_decode"] = _warm_reference(port, proc.pid, setup)
        finally:
            stop_process(proc, timeout=60)
            reader.join(5)
        if setup.timelines is not None and tl_file.exists():
            setup.timelines.parent.mkdir(parents=True, exist_ok=True)
            setup.timelines.write_text(tl_file.read_text())
            extra["timelines_json"] = str(setup.timelines)
    first_sent = min(s["sent_at"] for s in streams)
    return _record("cicada-spawn" if spawn else "cicada", first_sent, streams, rss, resident,
                   t_spawn if spawn else None, send_spread_s=max(s["sent_at"] for s in streams) - first_sent, **extra)


def _memory(pid: int, rss_key: str, hwm_key: str) -> dict[str, int | None]:
    status = f"/proc/{pid}/status"
    return {rss_key: kib_field(status, b"VmRSS:"), hwm_key: kib_field(status, b"VmHWM:")}


def _warm_reference(port: int, pid: int, setup: Setup) -> dict[str, Any]:
    """The same burst again on the now-warm model, once the server is idle (what the cold
    start left running, e.g. the plan file's write, must not land in the warm steps)."""
    idle_s = wait_idle(pid, max_s=30)
    n = warm_tokens(setup.max_tokens, setup.burst)
    warm_streams = release(port, replace(setup, max_tokens=n))
    return {"idle_wait_s": idle_s, "max_tokens": n, "ttft_s": [s["ttft_s"] for s in warm_streams],
            **decode_record(warm_streams)}


def _go_worker(argv: list[str], setup: Setup, err: Any) -> tuple[subprocess.Popen[bytes], ChildRss, int, float]:
    """The worker started, ready, its weights evicted, ``go`` written; its stderr goes to the
    file ``err`` (a pipe nobody reads would fill with llama.cpp's load log and stall it)."""
    proc = subprocess.Popen([sys.executable, "-m", "cicada_async.bench.first_token_peers", *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    rss = ChildRss(proc.pid)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    if b'"ready"' not in line:
        stop_process(proc)
        raise RuntimeError(f"worker not ready: {_tail(err)}")
    resident = _evict(setup.evict)
    t_go = time.time()
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    return proc, rss, resident, t_go


def _tail(err: Any) -> str:
    err.flush()
    err.seek(0)
    return str(err.read().decode(errors="replace").strip()[-500:])


def _last_json(proc: subprocess.Popen[bytes], rss: ChildRss, what: str,
               tail: Callable[[bytes], str]) -> dict[str, Any]:
    """A worker's run to its end (bounded): the JSON of its last stdout line, or its error."""
    try:
        out, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop_process(proc)
        rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited with {proc.returncode}: {tail(stderr or b'')}")
    doc: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return doc


def run_hf(kind: str, setup: Setup) -> dict[str, Any]:
    argv = ["hf", kind, str(setup.model_dir), setup.uri, json.dumps(setup.prompts), str(setup.burst), str(setup.max_tokens),
            str(usable_cores()), json.dumps(setup.storage)]
    with tempfile.TemporaryFile() as err:
        proc, rss, resident, t_go = _go_worker(argv, setup, err)
        doc = _last_json(proc, rss, f"{kind} worker", lambda _stderr: _tail(err))
    stamps = doc["token_stamps"]
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    streams = [{"first_at": t, "prompt_tokens": doc["prompt_tokens"], "decode_tok_s": decode}
               for t in doc["first_token_at"]]
    return _record(kind, t_go, streams, rss, resident,
                   marks={k: v - t_go for k, v in doc["marks"].items()}, threads=doc["threads"])


def run_llama_cpp(setup: Setup) -> dict[str, Any]:
    if setup.gguf is None:
        raise RuntimeError("no GGUF (give --converter)")
    port, cores = free_port(), str(usable_cores())
    argv = ["llama-server", "--model", str(setup.gguf), "--model_alias", setup.name, "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", cores, "--n_threads_batch", cores, "--n_ctx", "2048",
            "--interrupt_requests", "False"]
    # llama.cpp maps the GGUF, not the safetensors: that file is what must start cold (it sat
    # beside the model directory, outside the evicted list: llama-1b's 3.8 GB first token came
    # in 1.2 s, under the 2.0 s its read alone takes).
    cold = replace(setup, evict=[*setup.evict, setup.gguf])
    with tempfile.TemporaryFile() as err:
        proc, rss, resident, t_go = _go_worker(argv, cold, err)
        assert proc.stdout is not None
        drain = threading.Thread(target=proc.stdout.read, daemon=True)  # its stdout, unread, must not fill
        drain.start()
        try:
            sent = _wall(release(port, setup, proc))
        except RuntimeError as e:
            raise RuntimeError(f"{e}; server log: {_tail(err)}") from e
        finally:
            stop_process(proc)
            rss.stop()
    # The requests count as sent at go: they waited for the port while the model loaded.
    streams = [{k: v for k, v in s.items() if k != "sent_at"} for s in sent]
    return _record("llama.cpp", t_go, streams, rss, resident, decode=decode_record(sent),
                   port_accepted_after_go_s=min(s["sent_at"] for s in sent) - t_go)


def run_floor(setup: Setup) -> dict[str, Any]:
    """Spawn -> imports + one warm prefill of the cell's batch (weights warm, checked)."""
    resident = warm(setup.model_dir)
    t_spawn = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "cicada_async.bench.first_token_peers", "floor",
                             str(setup.model_dir), str(setup.prompt_tokens), str(setup.burst), str(usable_cores())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rss = ChildRss(proc.pid)
    doc = _last_json(proc, rss, "floor", lambda stderr: stderr.decode(errors="replace")[-500:])
    cost = rss.cost(t_spawn, doc["t_done"])
    return {"peer": "floor", "spawn_to_first_s": doc["t_done"] - t_spawn, "imports_s": doc["t_imports"] - t_spawn,
            "build_s": doc["t_built"] - doc["t_imports"], "prefill_s": doc["t_done"] - doc["t_built"],
            "cost": cost, "resident_before_bytes": resident}


def run_peer(peer: str, setup: Setup) -> dict[str, Any]:
    if peer in ("cicada", "cicada-spawn"):
        return run_cicada(setup, spawn=peer == "cicada-spawn")
    if peer in ("transformers", "download-then-load", "tensorizer"):
        return run_hf(peer, setup)
    if peer == "llama.cpp":
        return run_llama_cpp(setup)
    if peer == "floor":
        return run_floor(setup)
    raise ValueError(f"unknown peer {peer!r}")
