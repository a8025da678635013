"""The stock side of ``cicada bench ray-serve``: Ray Serve's model-multiplexing guide, written as a user would.

``StockModels`` is deployed next to cicada's Ray Serve app on the bench's cluster
(``ray_cluster.Bed``) with the same resources and autoscaling; ``ray_serve``'s docstring says
what it is measured against. Ray's workers import it by this module's name.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, cast

from ray import serve
from ray.serve import Deployment

if TYPE_CHECKING:
    from ray.serve import Application

STOCK_MAX_MODELS = 3  # the guide's example; cicada's builder defaults to the same


def _process_started_at() -> float | None:
    """``ray_wire.process_started_at``, spelled out: the stock replica imports no module of ours
    but this one."""
    import time

    try:
        start_ticks = int(open("/proc/self/stat").read().rpartition(")")[2].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def is_decoder(model_dir: str) -> bool:
    with open(os.path.join(model_dir, "config.json")) as f:
        archs = json.load(f).get("architectures") or [""]
    return bool(str(archs[0]).endswith(("LMHeadModel", "ForCausalLM")))


class StockModels:
    """Ray Serve's multiplexing guide, with transformers: load in the loader, forward in the call.

    Deployed as ``serve.deployment(StockModels).options(...)`` with the bench's resources and
    autoscaling; everything else is as a user writes it.
    """

    def __init__(self, model_dirs: dict[str, str], threads: int) -> None:
        import time

        init_begin = time.time()  # for the bench's split of Ray's path (cicada's replica sends the same)
        import ray
        import torch  # a user's module imports these at its top: the replica's start pays them
        import transformers  # noqa: F401

        torch.set_num_threads(threads)
        self.model_dirs = model_dirs
        # Which replica and node answered (two response headers; the bench checks freshness).
        self.where = {"bench-replica": serve.get_replica_context().replica_id.unique_id,
                      "bench-node": ray.get_runtime_context().get_node_id()}
        self.clock = " ".join("-" if t is None else f"{t:.3f}" for t in (_process_started_at(), init_begin, time.time()))

    @serve.multiplexed(max_num_models_per_replica=STOCK_MAX_MODELS)  # type: ignore[untyped-decorator]
    async def get_model(self, model_id: str) -> Any:
        from transformers import AutoModel, AutoModelForCausalLM

        model_dir = self.model_dirs[model_id]
        cls = AutoModelForCausalLM if is_decoder(model_dir) else AutoModel
        return cls.from_pretrained(model_dir).eval()

    async def __call__(self, request: Any) -> Any:
        import time

        import torch
        from starlette.responses import Response

        t0, entered = time.perf_counter(), time.time()  # the replica's own time, as cicada's replica reports it
        model = await self.get_model(serve.get_multiplexed_model_id())
        body = await request.json()
        inp = body["inputs"][0]
        ids = torch.tensor(inp["data"], dtype=torch.int64).reshape(inp["shape"])
        with torch.inference_mode():
            out = model(input_ids=ids)[0]
        return Response(out.numpy().tobytes(), media_type="application/octet-stream",
                        headers={**self.where, "bench-shape": json.dumps(list(out.shape)),
                                 "bench-replica-s": f"{time.perf_counter() - t0:.6f}",
                                 "bench-replica-clock": f"{self.clock} {entered:.3f}"})


def stock_app(model_dirs: dict[str, str], autoscaling: dict[str, Any], replica_cpus: float,
              max_ongoing: int) -> Application:
    dep = cast(Deployment, serve.deployment(StockModels)).options(
        autoscaling_config=autoscaling, ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max_ongoing)
    app: Application = dep.bind(model_dirs, max(1, int(replica_cpus)))
    return app
