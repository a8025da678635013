"""The repository index endpoint over a real model repository directory and the real engine:
a folder added at run time is served like a configured one (metadata before its first load),
and a rescan racing scrapes and warm requests breaks neither.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import torch

from cicada_async.service.config import Config, ModelConfig, ServerConfig, scan_repository
from tests.fixtures.helpers import inputs_for, reference
from tests.fixtures.server import live_server, v2_infer

T = aiohttp.ClientTimeout(total=60)


def _repo_config(root: Path) -> Config:
    # As the config file's `model_repository` key does: the folders found at start are models.
    return Config(server=ServerConfig(host="127.0.0.1", port=0), models=dict(scan_repository(root)),
                  model_repository=root)


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        # Hard links: many model folders for the price of one. Only the model's files: a plan
        # directory (.cicada/) that an earlier load wrote beside them is not the model's.
        if f.is_file():
            os.link(f, dst / f.name)



def test_added_folder_gets_metadata_before_its_first_load(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    _copy_model(model_dirs["tiny-mlp"], root / "first")
    with live_server(_repo_config(root)) as srv:
        _copy_model(model_dirs["tiny-gpt2"], root / "added")

        async def go() -> list[object]:
            async with aiohttp.ClientSession(srv.http_url, timeout=T) as s:
                async with s.post("/v2/repository/index") as r:
                    assert r.status == 200
                    names = {m["name"]: m["state"] for m in await r.json()}
                assert names == {"first": "UNAVAILABLE", "added": "UNAVAILABLE"}
                # describe() reads the config files in the background: bounded wait for it.
                end = time.monotonic() + 20
                while True:
                    async with s.get("/v2/models/added") as r:
                        assert r.status == 200
                        inputs: list[object] = (await r.json())["inputs"]
                    if inputs or time.monotonic() > end:
                        return inputs
                    await asyncio.sleep(0.05)

        inputs = srv.call(go)
        assert [i["name"] for i in inputs] == ["input_ids"]  # type: ignore[index]
        # Never loaded, so its metadata came from describe(); and it has a prebuilt skeleton.
        assert srv.sync(lambda: srv.repo.get("added").state) == "unloaded"
        srv.wait_until(lambda: srv.repo.get("added").instance._ready.ready, 20)  # type: ignore[attr-defined]


def test_rescan_racing_scrapes_and_warm_infers(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    src = model_dirs["tiny-mlp"]
    _copy_model(src, root / "warm")
    inputs = inputs_for(src)
    want = reference(src, inputs)
    # Switch threads often, so that a rescan thread touching loop-owned dicts would be caught
    # mid-iteration ("dictionary changed size during iteration") rather than by luck.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        _race(srv_config=_repo_config(root), root=root, src=src, inputs=inputs, want=want)
    finally:
        sys.setswitchinterval(old)


def _race(srv_config: Config, root: Path, src: Path, inputs: dict[str, torch.Tensor],
          want: dict[str, torch.Tensor]) -> None:
    with live_server(srv_config) as srv:
        async def go() -> None:
            async with aiohttp.ClientSession(srv.http_url, timeout=T) as s:
                await v2_infer(s, "warm", inputs)
                stop = asyncio.Event()

                async def scrape() -> int:
                    n = 0
                    while not stop.is_set():
                        async with s.get("/metrics") as r:
                            assert r.status == 200, await r.text()
                        n += 1
                    return n

                async def infer() -> int:
                    n = 0
                    while not stop.is_set():
                        got = await v2_infer(s, "warm", inputs)
                        assert torch.equal(got["output"], want["output"])
                        n += 1
                    return n

                workers = [asyncio.ensure_future(f()) for f in (scrape, scrape, infer, infer)]
                try:
                    for batch in range(4):
                        for i in range(60):
                            _copy_model(src, root / f"m{batch}-{i:03d}")
                        async with s.post("/v2/repository/index") as r:
                            assert r.status == 200, await r.text()
                            assert len(await r.json()) == 1 + 60 * (batch + 1)
                finally:
                    stop.set()
                counts = await asyncio.wait_for(asyncio.gather(*workers), 60)
                assert all(counts), counts

        srv.call(go, timeout=300)
        assert srv.sync(lambda: len(srv.repo.models)) == 241
