"""The Knative runtime contract, on a real ``cicada serve`` process.

What the shared reference knative.md says the container owes the platform: serve on
0.0.0.0:$PORT, accept the K_* environment, answer liveness without waiting for any model, and
on SIGTERM stop admitting, finish what was admitted and exit 0 inside the grace period.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cicada_async.bench.process_start import example_request
from cicada_async.models.catalogue import make_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-gpt2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":  # 0A: TCP_LISTEN
                found.add(addr)
    return found


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    make_model(MODEL, root / MODEL, seed=3)
    return root


class Server:
    def __init__(self, repo: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.env = dict(os.environ, PORT=str(self.port), K_SERVICE="cicada", K_REVISION="cicada-00001",
                        K_CONFIGURATION="cicada", **(env or {}))
        self.t_spawn = time.monotonic()
        # No --port: the port must come from $PORT.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cicada_async", "serve", "--model-repository", str(repo)],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )

    def wait_live(self, timeout: float = 45.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stdout.read().decode()[-2000:]}")
            try:
                if request(self.port, "GET", "/v2/health/live", timeout=2)[0] == 200:
                    return time.monotonic() - self.t_spawn
            except OSError:
                pass
            time.sleep(0.01)
        raise AssertionError("server never answered /v2/health/live")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(40)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()


def test_port_address_env_and_liveness_before_any_load(repo: Path) -> None:
    srv = Server(repo)
    try:
        to_live = srv.wait_live()
        # Live answers before any model is loaded: nothing was requested yet, and the index
        # still shows the model unloaded (a server that loaded at start would show READY).
        status, body = request(srv.port, "POST", "/v2/repository/index", b"{}")
        assert status == 200
        assert f'"name":"{MODEL}"'.encode() in body and b'"READY"' not in body
        assert request(srv.port, "GET", "/v2/health/ready")[0] == 200
        # The port came from $PORT and the socket listens on the wildcard address, so that
        # queue-proxy (another container in the pod) can reach it.
        addrs = listening_addresses(srv.port)
        if addrs:  # /proc/net is Linux only
            assert addrs & {"00000000", "00000000000000000000000000000000"}, addrs
        # Process start to live: interpreter and imports (torch), no model work. Generous bound
        # for a loaded CI machine; the measured figure is in docs/process-start.md.
        assert to_live < 30.0, to_live
        status, _ = request(srv.port, "POST", f"/v2/models/{MODEL}/infer", example_request(repo / MODEL, seq=8))
        assert status == 200
    finally:
        assert srv.stop() == 0


def test_sigterm_drains_in_flight_requests_and_exits_0(repo: Path) -> None:
    srv = Server(repo)
    try:
        srv.wait_live()
        body = example_request(repo / MODEL, seq=16)
        n = 8
        pool = concurrent.futures.ThreadPoolExecutor(n)
        # The first request starts the model's cold start; the others queue behind it.
        futs = [pool.submit(request, srv.port, "POST", f"/v2/models/{MODEL}/infer", body) for _ in range(n)]
        pending = 0.0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(f.done() for f in futs):
            status, text = request(srv.port, "GET", "/metrics")
            m = re.search(rf'nv_inference_pending_request_count\{{model="{MODEL}",version="1"\}} (\S+)', text.decode())
            pending = float(m.group(1)) if m else 0.0
            if pending >= 1:
                break
            time.sleep(0.005)
        assert pending >= 1, "no request was in flight when SIGTERM was to be sent"
        t_term = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=40) for f in futs]
        pool.shutdown()
        assert [s for s, _ in results] == [200] * n, [(s, b[:200]) for s, b in results]
        code = srv.proc.wait(40)
        drain_s = time.monotonic() - t_term
        assert code == 0
        # Inside shutdown_timeout_s (25 s default), itself below grace period - 30 s drain.
        assert drain_s < 25.0, drain_s
        with pytest.raises(OSError):  # nothing listens any more
            request(srv.port, "GET", "/v2/health/live", timeout=2)
    finally:
        srv.stop()


def test_bad_port_env_fails_fast(repo: Path) -> None:
    port = "not-a-port"
    proc = subprocess.run(
        [sys.executable, "-m", "cicada_async", "serve", "--model-repository", str(repo)],
        cwd=ROOT, env=dict(os.environ, PORT=port), capture_output=True, timeout=60,
    )
    assert proc.returncode == 2
    assert b"$PORT must be an integer" in proc.stderr
