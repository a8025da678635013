"""The bed of ``cicada bench ray-serve``: a two-node local Ray cluster, both apps, its processes.

``Bed`` starts the cluster (head and one worker node), Serve's proxy on the head, and deploys
cicada's app and the stock one (``ray_stock``) side by side; it counts model replicas and
waits for scale to zero. ``Descendants`` and ``Watcher`` record every process started under
this one (by pid and start time) so that cleanup kills only what this run left alive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, cast

from ray import serve

from cicada_async.bench.ray_stock import STOCK_MAX_MODELS, stock_app

STRATEGIES = ("cicada", "stock")
APP_DEPLOYMENT = {"cicada": "CicadaModels", "stock": "StockModels"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, start time) of every process we can read."""
    table: dict[int, tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        table[int(d)] = (int(fields[1]), fields[19])
    return table


class Descendants:
    """Every process started under this one (raylets, GCS, Ray workers), by pid and start time."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self._lock = threading.Lock()

    def record(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo, found = [os.getpid()], []
        while todo:
            for c in children.get(todo.pop(), []):
                found.append(c)
                todo.append(c)
        with self._lock:
            for pid in found:
                self.seen.setdefault(pid, table[pid][1])

    def alive(self) -> list[int]:
        table = _proc_table()
        with self._lock:
            return [p for p, st in self.seen.items() if p in table and table[p][1] == st]

    def kill_left(self, grace_s: float = 5.0) -> list[int]:
        """SIGTERM what is still alive, then SIGKILL after ``grace_s``; the pids that were left."""
        left = self.alive()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.alive():
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace_s
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        return left


class Watcher(threading.Thread):
    """Records the descendants every second while the cluster runs (workers come and go)."""

    def __init__(self, procs: Descendants) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.procs.record()
            self.halt.wait(1.0)


def _code_root() -> str:
    import cicada_async

    return str(Path(cicada_async.__file__).resolve().parent.parent)


class Bed:
    """The two-node cluster, Serve's proxy and both applications."""

    def __init__(self, args: argparse.Namespace, model_dirs: dict[str, Path], procs: Descendants) -> None:
        import ray
        from ray.cluster_utils import Cluster

        from cicada_async.service.ray_serve import build

        self.procs = procs
        self.tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths
        node = {"num_cpus": args.node_cpus, "object_store_memory": 256 << 20, "temp_dir": str(self.tmp)}
        # Cluster() also writes the head's address to <RAY_TMPDIR or /tmp>/ray/ray_current_cluster,
        # whatever temp_dir says; on a machine that never ran Ray that folder does not exist.
        os.makedirs(os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray"), exist_ok=True)
        t0 = time.monotonic()
        self.cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        procs.record()
        self.worker = self.cluster.add_node(**node)
        procs.record()
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.ray_start_s = time.monotonic() - t0
        # Where the cluster's workers import this project from: a clean worktree's run must
        # measure that tree (PYTHONPATH, inherited by the raylets), not the editable install.
        self.worker_code = str(ray.get(ray.remote(_code_root).remote()))
        self.port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.port})
        autoscaling: dict[str, Any] = {
            "min_replicas": 0, "max_replicas": args.max_replicas, "target_ongoing_requests": 2,
            "upscale_delay_s": 0.0, "downscale_delay_s": args.downscale_delay_s,
            "metrics_interval_s": 0.2, "look_back_period_s": 0.5}
        self.autoscaling = autoscaling
        toml = self.tmp / "cicada.toml"
        toml.write_text("".join(f"[models.{json.dumps(m)}]\nuri = {json.dumps(str(d.resolve()))}\n\n"
                                for m, d in model_dirs.items()))
        self.serve_run_s: dict[str, float] = {}
        t0 = time.monotonic()
        serve.run(build({"config": str(toml), **{k: autoscaling[k] for k in (
                             "min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                             "downscale_delay_s")},
                         "autoscaling": {"metrics_interval_s": 0.2, "look_back_period_s": 0.5},
                         "max_ongoing_requests": args.max_ongoing, "max_models_per_replica": STOCK_MAX_MODELS,
                         "num_cpus": args.replica_cpus}),
                  name="cicada", route_prefix="/cicada")
        self.serve_run_s["cicada"] = time.monotonic() - t0
        t0 = time.monotonic()
        serve.run(stock_app({m: str(d.resolve()) for m, d in model_dirs.items()}, autoscaling,
                            args.replica_cpus, args.max_ongoing), name="stock", route_prefix="/stock")
        self.serve_run_s["stock"] = time.monotonic() - t0
        procs.record()

    def replicas(self, app: str) -> int:
        """Model replicas of ``app`` starting, running or stopping (anything but STOPPED)."""
        status = serve.status().applications.get(app)
        if status is None:
            return 0
        dep = status.deployments.get(APP_DEPLOYMENT[app])
        if dep is None:
            return 0
        return sum(int(n) for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) != "STOPPED")

    def wait_zero(self, timeout_s: float) -> float:
        """Until no model replica of either app exists; the seconds waited."""
        t0 = time.monotonic()
        while any(self.replicas(a) for a in STRATEGIES):
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"replicas did not scale to zero in {timeout_s:.0f} s: "
                                   + ", ".join(f"{a}={self.replicas(a)}" for a in STRATEGIES))
            time.sleep(0.25)
        time.sleep(0.5)  # the stopped replica's worker process exits
        self.procs.record()
        return time.monotonic() - t0

    def close(self) -> None:
        import ray

        self.procs.record()
        steps: list[Callable[[], object]] = [serve.shutdown, ray.shutdown,
                                             cast(Callable[[], object], self.cluster.shutdown)]
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - go on tearing down
                print(f"cleanup: {step.__qualname__} failed: {e}", file=sys.stderr, flush=True)
