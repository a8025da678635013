"""Real gRPC clients against a live server, each run in a child process of its own.

``python -m tests.service.grpc_probe SCENARIO GRPC_PORT HTTP_PORT`` prints one JSON object of
what the client saw; tests/service/test_grpc.py asserts on it. A child process because
tritonclient.grpc and kserve both register the protobuf package ``inference`` and cannot be
imported into one process (nor into the pytest process, which imports kserve elsewhere).

Tokens (the server's config in test_grpc.py): ``all-token`` has both scopes, ``inf-token``
only inference.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

warnings.simplefilter("ignore")  # third-party deprecation noise on stderr only
ALL = {"authorization": "Bearer all-token"}
INF = {"authorization": "Bearer inf-token"}
IDS = np.array([[1, 2, 3, 4]], dtype=np.int64)


def _status(fn: Callable[[], Any]) -> str:
    """The gRPC status name ``fn`` failed with, or "OK"."""
    from tritonclient.utils import InferenceServerException

    try:
        fn()
    except InferenceServerException as e:
        return str(e.status()).removeprefix("StatusCode.")
    return "OK"


def _pending(http_port: int, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    key = f'nv_inference_pending_request_count{{model="{model}",version="1"}} '
    return next((float(line[len(key):]) for line in text.splitlines() if line.startswith(key)), 0.0)


def _wait(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def triton_sync(port: int, http_port: int) -> dict[str, Any]:
    import tritonclient.grpc as g

    c = g.InferenceServerClient(f"127.0.0.1:{port}")

    def ids(data: np.ndarray = IDS, datatype: str = "INT64") -> Any:
        i = g.InferInput("input_ids", list(data.shape), datatype)
        i.set_data_from_numpy(data)
        return i

    def stats() -> dict[str, Any]:
        return c.get_inference_statistics("mlp", headers=ALL, as_json=True)["model_stats"][0]

    out: dict[str, Any] = {
        "live": c.is_server_live(), "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready("mlp", headers=ALL),
        "server_metadata": c.get_server_metadata(headers=ALL, as_json=True),
        "stats_before": stats(),
    }
    res = c.infer("mlp", [ids()], outputs=[g.InferRequestedOutput("output")], priority=1, request_id="g1",
                  headers=ALL, client_timeout=30)
    out["infer"] = {"id": res.get_response().id, "output": res.as_numpy("output").tolist()}
    out["metadata"] = c.get_model_metadata("mlp", headers=ALL, as_json=True)
    out["config"] = c.get_model_config("mlp", headers=ALL, as_json=True)["config"]
    out["status"] = {
        "unknown_model": _status(lambda: c.infer("nope", [ids()], headers=ALL)),
        "unknown_version": _status(lambda: c.get_model_metadata("mlp", "7", headers=ALL)),
        "wrong_datatype": _status(lambda: c.infer("mlp", [ids(IDS.astype(np.float32), "FP32")], headers=ALL)),
        "too_large": _status(lambda: c.infer("mlp", [ids(np.zeros((1, 300_000), np.int64))], headers=ALL)),
        "broken_model": _status(lambda: c.infer("broken", [ids()], headers=ALL, client_timeout=30)),
        "no_token": _status(lambda: c.infer("mlp", [ids()])),
        "bad_token": _status(lambda: c.get_model_metadata("mlp", headers={"authorization": "Bearer nope"})),
        "inference_token_on_repository": _status(lambda: c.get_model_repository_index(headers=INF)),
    }
    out["stats_after"] = stats()
    out["all_stats"] = c.get_inference_statistics(headers=ALL, as_json=True)["model_stats"]
    c.unload_model("mlp", headers=ALL)
    out["index_after_unload"] = c.get_model_repository_index(headers=ALL, as_json=True)["models"]
    c.load_model("mlp", headers=ALL)
    out["index_after_load"] = c.get_model_repository_index(headers=ALL, as_json=True)["models"]
    c.close()
    return out


def triton_overload(port: int, http_port: int) -> dict[str, Any]:
    """The slow model (max_queue 1, a cold start of minutes): full queue, displacement, deadline."""
    import tritonclient.grpc as g

    def send(**kw: Any) -> str:
        c = g.InferenceServerClient(f"127.0.0.1:{port}")
        i = g.InferInput("input_ids", [1, 4], "INT64")
        i.set_data_from_numpy(IDS)
        try:
            return _status(lambda: c.infer("slow", [i], headers=ALL, **kw))
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # The first request starts the cold start and gives up (its client deadline); the
        # load goes on, and the next request waits in the heap for it, filling the queue.
        rider = pool.submit(send, client_timeout=1.0)
        _wait(lambda: _pending(http_port, "slow") >= 1)
        queued = pool.submit(send, client_timeout=20.0)
        _wait(lambda: _pending(http_port, "slow") >= 2)
        full = send(client_timeout=20.0)
        # Priority 1 displaces the queued priority-10 request, then expires in the heap.
        expired = send(priority=1, timeout=300_000, client_timeout=20.0)
        return {"rider": rider.result(30), "queued_then_displaced": queued.result(30), "queue_full": full,
                "deadline": expired}


def triton_drain(port: int, http_port: int) -> dict[str, Any]:
    """Prints "ready" once a request rides the slow cold start, then waits for a line on stdin
    (the test sends SIGTERM to the server meanwhile) and asks the draining server."""
    import tritonclient.grpc as g

    c = g.InferenceServerClient(f"127.0.0.1:{port}")
    i = g.InferInput("input_ids", [1, 4], "INT64")
    i.set_data_from_numpy(IDS)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        rider = pool.submit(_status, lambda: c.infer("slow", [i], headers=ALL, client_timeout=30))
        _wait(lambda: _pending(http_port, "slow") >= 1)
        print("ready", flush=True)
        sys.stdin.readline()
        out = {"live": c.is_server_live(), "ready": c.is_server_ready(),
               "new_infer": _status(lambda: c.infer("mlp", [i], headers=ALL, client_timeout=10)),
               "rider": rider.result(30)}
    c.close()
    return out


def triton_aio(port: int, http_port: int) -> dict[str, Any]:
    import tritonclient.grpc.aio as ga

    async def main() -> dict[str, Any]:
        c = ga.InferenceServerClient(f"127.0.0.1:{port}")
        i = ga.InferInput("input_ids", [1, 4], "INT64")
        i.set_data_from_numpy(IDS)
        try:
            before = (await c.get_inference_statistics("mlp", headers=ALL, as_json=True))["model_stats"][0]
            res = await c.infer("mlp", [i], headers=ALL, priority=2, client_timeout=30)
            after = (await c.get_inference_statistics("mlp", headers=ALL, as_json=True))["model_stats"][0]
            return {"live": await c.is_server_live(), "ready": await c.is_model_ready("mlp", headers=ALL),
                    "output": res.as_numpy("output").tolist(), "stats_before": before, "stats_after": after,
                    "config": (await c.get_model_config("mlp", headers=ALL, as_json=True))["config"]}
        finally:
            await c.close()

    return asyncio.run(main())


def kserve_client(port: int, http_port: int) -> dict[str, Any]:
    import grpc
    import kserve

    async def main() -> dict[str, Any]:
        hdrs = tuple(ALL.items())
        # retries=0: an error must reach us as the server sent it, not after the client's retries.
        c = kserve.InferenceGRPCClient(f"127.0.0.1:{port}", timeout=30, retries=0)
        try:
            out: dict[str, Any] = {"live": await c.is_server_live(headers=hdrs),
                                   "ready": await c.is_server_ready(headers=hdrs),
                                   "model_ready": await c.is_model_ready("mlp", headers=hdrs)}
            for mode in ("raw", "contents"):
                if mode == "raw":  # numpy data: kserve sends raw_input_contents
                    inp = kserve.InferInput("input_ids", [1, 4], "INT64")
                    inp.set_data_from_numpy(IDS)
                else:  # a list: kserve sends typed contents (int64_contents)
                    inp = kserve.InferInput("input_ids", [1, 4], "INT64", data=IDS.reshape(-1).tolist())
                res = await c.infer(kserve.InferRequest("mlp", infer_inputs=[inp], request_id=f"k-{mode}"),
                                    headers=hdrs)
                out[mode] = {"id": res.id, "output": res.outputs[0].as_numpy().tolist()}
            try:
                await c.infer(kserve.InferRequest("nope", infer_inputs=[inp]), headers=hdrs)
                out["unknown_model"] = "OK"
            except grpc.aio.AioRpcError as e:
                out["unknown_model"] = e.code().name
            return out
        finally:
            await c.close()

    return asyncio.run(main())


SCENARIOS = {"triton_sync": triton_sync, "triton_overload": triton_overload, "triton_drain": triton_drain,
             "triton_aio": triton_aio, "kserve": kserve_client}

if __name__ == "__main__":
    name, grpc_port, http_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(SCENARIOS[name](grpc_port, http_port)))
