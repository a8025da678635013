"""Warm per-request overhead of the server over the model's own forward.

  python loadtest/overhead.py [--model tiny-mlp] [-n 2000] [--seq 16]

Starts ``cicada serve`` on 127.0.0.1, loads the model, sends ``n`` sequential binary infer
requests from one pre-encoded body (aiohttp, one keep-alive connection) and compares the
end-to-end p50 with the p50 of the same forward run in-process by plain PyTorch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cicada_async.bench.origins import free_port  # noqa: E402
from loadtest.run_locust import wait_ready  # noqa: E402


def plain_forward_p50(path: Path, ids: "object", n: int) -> float:
    import torch
    from safetensors.torch import load_file

    spec_file = path / "cicada.json"
    if spec_file.exists():
        spec = json.loads(spec_file.read_text())
        mod, _, attr = spec["factory"].partition(":")
        model = getattr(__import__(mod, fromlist=[attr]), attr)(**spec["kwargs"])
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    else:
        import transformers

        arch = json.loads((path / "config.json").read_text())["architectures"][0]
        model = getattr(transformers, arch).from_pretrained(str(path))
    model.eval()
    x = torch.from_numpy(ids)
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t = time.perf_counter()
            model(input_ids=x)
            times.append(time.perf_counter() - t)
    return statistics.median(times[n // 10:])


async def client_p50(url: str, model: str, ids: "object", n: int) -> list[float]:
    import aiohttp
    import orjson

    raw = ids.tobytes()  # type: ignore[attr-defined]
    header = orjson.dumps({"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64",  # type: ignore[attr-defined]
         "parameters": {"binary_data_size": len(raw)}}]})
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    times = []
    async with aiohttp.ClientSession(url) as s:
        for _ in range(n):
            t = time.perf_counter()
            async with s.post(f"/v2/models/{model}/infer", data=header + raw, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            times.append(time.perf_counter() - t)
    return times[n // 10:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-mlp")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--seq", type=int, default=16)
    args = ap.parse_args()
    import numpy as np

    from cicada_async.models.catalogue import make_model

    tmp = Path(tempfile.mkdtemp(prefix="cicada-overhead-"))
    path = make_model(args.model, tmp / args.model)
    ids = np.random.default_rng(0).integers(0, 200, (1, args.seq), dtype=np.int64)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cicada_async", "serve", "--model-repository", str(tmp),
                               "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_ready(url)
        e2e = asyncio.run(client_p50(url, args.model, ids, args.n))
    finally:
        server.terminate()
        server.wait(30)
    fwd = plain_forward_p50(path, ids, args.n)
    p50 = statistics.median(e2e)
    q = statistics.quantiles(e2e, n=100)
    print(f"model {args.model} seq {args.seq} n {args.n}")
    print(f"end-to-end p50 {p50 * 1e3:.3f} ms  p99 {q[98] * 1e3:.3f} ms")
    print(f"plain forward p50 {fwd * 1e3:.3f} ms")
    print(f"server+client overhead at p50: {(p50 - fwd) * 1e3:.3f} ms (target <= 1 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
