"""The served path's cold start for the remote benchmark: ``cicada serve``'s first answer.

The ``cicada`` strategy of ``remote.py`` times an ``Engine`` in a fresh process, from the load
to the first forward's outputs. A user meets the served path instead: a running ``cicada serve``
whose model repository is on S3 or HTTP, a V2 request over HTTP, the answer encoded. Issue 28
asks that the two agree or that the difference be explained, so ``cicada-served`` runs here, in
the same rotation and on the same link as every other strategy:

1. ``cicada serve --config`` with the model (named ``model``) at the same URI and storage
   settings, ``CICADA_PREFETCH=0`` (the server is running, not spawned for this request);
2. once it answers ``/v2/health/live`` and has gone idle (its startup describe read the
   model's config and headers from the origin), the caller's ``evict`` drops the model's
   local pages and the origin's files again, as before every other strategy's run;
3. the clock: one V2 infer request (the same shape as the engine bench's inputs, binary
   outputs) sent to the full answer read back; the answer's status must be 200.

The server's own startup is outside the clock, as it is for a running server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cicada_async.bench.first_token_runs import wait_idle
from cicada_async.bench.origins import free_port, stop_process, wait_port
from cicada_async.bench.process_start import _http, example_request

STRATEGY = "cicada-served"
READY_S = 120.0
IDLE_MAX_S = 60.0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def serve_config(uri: str, storage: dict[str, dict[str, Any]]) -> str:
    """cicada.toml with the storage tables and one model, ``model``, at ``uri``."""
    lines: list[str] = []
    for kind, settings in storage.items():
        lines.append(f"[storage.{kind}]")
        lines += [f"{k} = {_toml(v)}" for k, v in settings.items()]
    lines += ["[models.model]", f"uri = {_toml(uri)}"]
    return "\n".join(lines) + "\n"


def served_run(uri: str, storage: dict[str, dict[str, Any]], model_dir: Path,
               evict: Callable[[], None], seq: int = 128) -> dict[str, Any]:
    """One cold first answer of a running ``cicada serve``; ``{"total_s": ...}`` or ``{"error": ...}``."""
    body = example_request(model_dir, seq)
    with tempfile.TemporaryDirectory(prefix="cicada-served-") as tmpd:
        cfg = Path(tmpd) / "cicada.toml"
        cfg.write_text(serve_config(uri, storage))
        port = free_port()
        env = dict(os.environ, PORT=str(port), CICADA_PREFETCH="0", PYTHONUNBUFFERED="1")
        log = Path(tmpd) / "serve.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "cicada_async", "serve", "--config", str(cfg)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            t_spawn = time.perf_counter()
            wait_port(port, proc, timeout=READY_S)
            while _http(port, "GET", "/v2/health/live", timeout=5)[0] != 200:
                time.sleep(0.01)
            ready_s = time.perf_counter() - t_spawn
            idle_wait = wait_idle(proc.pid, max_s=IDLE_MAX_S)
            evict()
            t0 = time.perf_counter()
            status, answer = _http(port, "POST", "/v2/models/model/infer", body)
            total = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a failed run is recorded, never a survivor median
            return {"error": f"{type(e).__name__}: {e} | {_tail(log)}"}
        finally:
            stop_process(proc, timeout=30)
    if status != 200:
        return {"error": f"HTTP {status}: {answer[:300]!r}"}
    return {"total_s": total, "parts": {"server_ready_s": ready_s, "idle_wait_s": idle_wait,
                                        "answer_bytes": len(answer)}}


def _tail(log: Path) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return ""
