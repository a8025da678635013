"""Large bodies are decoded and encoded on the codec threads, not on the loop's default executor
that a cold start's disk reads and hashes fill: with the default executor saturated, a warm
request with a large body still gets its (exact) answer.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import aiohttp
import torch

from cicada_async.service.config import Config, ModelConfig, ServerConfig
from cicada_async.service.limits import OFFLOAD_BYTES
from protocols import v2
from tests.fixtures.helpers import reference
from tests.fixtures.server import live_server, v2_infer


def test_large_body_does_not_wait_for_the_default_executor(model_dirs: dict[str, Path]) -> None:
    mlp = model_dirs["tiny-mlp"]
    config = Config(server=ServerConfig(host="127.0.0.1", port=0), models={"mlp": ModelConfig(name="mlp", uri=str(mlp))})
    ids = torch.randint(0, 256, (1, 40_000), generator=torch.Generator().manual_seed(3))
    inputs = {"input_ids": ids}
    body, _ = v2.encode_request(inputs, binary=True)
    assert len(body) > OFFLOAD_BYTES
    want = reference(mlp, inputs)
    with live_server(config) as srv:
        srv.call(lambda: srv.repo.load("mlp"))
        release = threading.Event()
        # Every default-executor thread blocked, as a packed cold start's hashes would hold them.
        blockers = [srv.sync(lambda: asyncio.get_running_loop().run_in_executor(None, release.wait, 60.0))
                    for _ in range(64)]

        async def go() -> dict[str, torch.Tensor]:
            async with aiohttp.ClientSession(srv.http_url, timeout=aiohttp.ClientTimeout(total=20)) as s:
                return await v2_infer(s, "mlp", inputs)

        try:
            got = srv.call(go, timeout=30)
        finally:
            release.set()
            srv.call(lambda: asyncio.gather(*blockers))
    assert torch.equal(got["output"], want["output"])
