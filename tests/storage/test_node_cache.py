"""The node cache (backends/cache.py) against real origins: moto S3 and nginx.

Origin requests are counted by a FaultProxy between the engine and the server (no fault set),
so "a hit reads nothing from the origin" is seen at the origin's side, not taken on trust.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from backends import open_backend
from backends.cache import CachingBackend
from cicada_async.engine.pack import pack
from cicada_async.engine.runtime import Engine
from cicada_async.service.config import parse_config
from protocols.errors import ConfigError, StorageError
from tests.fixtures.faultproxy import Fault, FaultProxy
from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference
from tests.fixtures.storage import payload

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
READ_BYTES = 64 << 10
REMOTE: dict[str, Any] = {"chunk_bytes": 256 << 10, "concurrency": 4, "connect_timeout_s": 2,
                          "read_timeout_s": 2, "max_attempts": 3, "resume_attempts": 1,
                          "backoff_s": 0.01, "backoff_max_s": 0.05}


@dataclass
class Origin:
    uri: str
    storage: dict[str, dict[str, Any]]
    proxy: FaultProxy

    def gets(self, name: str = "") -> int:
        return sum(1 for e in self.proxy.log if e.method == "GET" and name in e.path)


Publish = Callable[..., Awaitable[Origin]]


@pytest_asyncio.fixture
async def publish(request: pytest.FixtureRequest, served_root: Path,
                  fault_proxy_factory: Any) -> AsyncIterator[Publish]:
    """``await publish(kind, files, bandwidth_bps=None)``: files on moto or nginx, behind a proxy."""
    cleanups: list[Callable[[], None]] = []

    async def make(kind: str, files: dict[str, bytes], bandwidth_bps: float | None = None) -> Origin:
        if kind == "s3":
            import boto3

            endpoint = request.getfixturevalue("moto_endpoint")
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            bucket = f"cache-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=bucket)
            for k, data in files.items():
                client.put_object(Bucket=bucket, Key=f"m/{k}", Body=data)

            def cleanup() -> None:
                for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
                client.delete_bucket(Bucket=bucket)

            cleanups.append(cleanup)
            proxy = await fault_proxy_factory(endpoint, bandwidth_bps=bandwidth_bps)
            settings = {**REMOTE, "endpoint_url": proxy.url, "region": "us-east-1", "op_timeout_s": 10}
            return Origin(f"s3://{bucket}/m", {"s3": settings}, proxy)
        directory = served_root / f"cache-{uuid.uuid4().hex[:12]}"
        directory.mkdir()
        for k, data in files.items():
            (directory / k).write_bytes(data)
        cleanups.append(lambda: shutil.rmtree(directory, ignore_errors=True))
        proxy = await fault_proxy_factory(request.getfixturevalue(f"{kind}_origin"), bandwidth_bps=bandwidth_bps)
        return Origin(f"{proxy.url}/{directory.name}/", {"http": dict(REMOTE)}, proxy)

    yield make
    for c in cleanups:
        c()


def files_of(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


async def cold_start(o: Origin, cache: dict[str, Any], inputs: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """One cold start in a fresh engine: its outputs and the files its tensors map."""
    async with Engine(storage=o.storage, read_bytes=READ_BYTES, read_timeout_s=20, load_timeout_s=30,
                      node_cache=cache) as engine:
        inst = engine.instance("m", o.uri, describe=False)
        out = await asyncio.wait_for(inst.infer(inputs), 30)
        return out, [Path(w.path) for w in inst._watches]


def entries(cache_dir: Path) -> dict[str, Path]:
    """key -> entry directory, from the sidecars."""
    found = {}
    for d in (cache_dir / "entries").iterdir():
        found[json.loads((d / "meta.json").read_bytes())["key"]] = d
    return found


def entry_bytes(cache_dir: Path) -> int:
    return sum((d / "data").stat().st_size for d in (cache_dir / "entries").iterdir())


# ------------------------------------------------------------------------- miss, then hit


@pytest.mark.parametrize("kind", ["s3", "nginx"])
async def test_miss_then_hit_reads_nothing_from_the_origin(kind: str, model_dirs: dict[str, Path],
                                                            publish: Publish, tmp_path: Path) -> None:
    model_dir = model_dirs["tiny-gpt2"]
    o = await publish(kind, files_of(model_dir))
    inputs = inputs_for(model_dir)
    want = reference(model_dir, inputs)
    cache = {"dir": str(tmp_path / "cache"), "max_bytes": 1 << 30}

    out, mapped = await cold_start(o, cache, inputs)
    assert_equal_outputs(out, want)
    assert o.gets("model.safetensors") > 1 and mapped == []  # a miss lands in arenas
    found = entries(tmp_path / "cache")
    assert (found["model.safetensors"] / "data").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert {"config.json", "model.safetensors"} <= set(found)
    assert not list((tmp_path / "cache" / "tmp").iterdir())

    o.proxy.log.clear()
    out, mapped = await cold_start(o, cache, inputs)
    assert_equal_outputs(out, want)
    assert o.gets() == 0, [e.path for e in o.proxy.log if e.method == "GET"]
    assert any(e.method == "HEAD" for e in o.proxy.log)  # versions are still checked
    # The hit went through the local file path: the tensors map the cached file.
    assert mapped == [found["model.safetensors"] / "data"]


# ------------------------------------------------------------------------- corrupt entries


def _truncate(data: Path) -> None:
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)


def _drop_sidecar(data: Path) -> None:
    (data.parent / "meta.json").unlink()


def _flip_byte(data: Path) -> None:
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size - 100)  # inside the last tensor: size and header stay valid
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.mark.parametrize("damage", [_truncate, _drop_sidecar, _flip_byte], ids=["truncated", "no sidecar", "flipped byte"])
async def test_corrupt_entry_is_dropped_and_fetched_again(damage: Callable[[Path], None],
                                                          model_dirs: dict[str, Path], publish: Publish,
                                                          tmp_path: Path) -> None:
    model_dir = model_dirs["tiny-gpt2"]
    if damage is _flip_byte:  # only a digest can tell a flipped byte: the packed model's manifest
        pack(model_dir, tmp_path / "packed")
        model_dir = tmp_path / "packed"
    o = await publish("nginx", files_of(model_dir))
    inputs = inputs_for(model_dir)
    want = reference(model_dir, inputs)
    cache_dir = tmp_path / "cache"
    cache = {"dir": str(cache_dir), "max_bytes": 1 << 30}
    await cold_start(o, cache, inputs)
    entry = entries(cache_dir)["model.safetensors"]
    if damage is _flip_byte:
        assert entry.name.startswith("sha256-")
    damage(entry / "data")

    o.proxy.log.clear()
    out, mapped = await cold_start(o, cache, inputs)
    assert_equal_outputs(out, want)
    assert o.gets("model.safetensors") > 1, "the damaged entry was not fetched again"
    assert o.gets() == o.gets("model.safetensors"), "entries that were fine were fetched again"
    assert mapped == []  # this load landed from the origin, not from the damaged file
    again = entries(cache_dir)["model.safetensors"] / "data"
    assert again.read_bytes() == (model_dir / "model.safetensors").read_bytes()

    o.proxy.log.clear()
    out, mapped = await cold_start(o, cache, inputs)  # and the refetched entry serves
    assert_equal_outputs(out, want)
    assert o.gets() == 0 and mapped == [again]


async def test_failed_fetch_leaves_no_entry(model_dirs: dict[str, Path], publish: Publish,
                                            tmp_path: Path) -> None:
    model_dir = model_dirs["tiny-gpt2"]
    o = await publish("nginx", files_of(model_dir))
    inputs = inputs_for(model_dir)
    cache_dir = tmp_path / "cache"
    cache = {"dir": str(cache_dir), "max_bytes": 1 << 30}
    o.proxy.fault = Fault("status", status=403, times=-1, weights_only=True)
    with pytest.raises(StorageError):
        await cold_start(o, cache, inputs)
    assert o.proxy.fault.applied >= 1
    assert "model.safetensors" not in entries(cache_dir)  # partial file discarded
    assert not list((cache_dir / "tmp").iterdir())
    o.proxy.fault = None
    out, _ = await cold_start(o, cache, inputs)
    assert_equal_outputs(out, reference(model_dir, inputs))
    assert "model.safetensors" in entries(cache_dir)


# ------------------------------------------------------------------------- LRU and byte bound

OBJ = MiB + 333
OBJECTS = {name: payload(OBJ, seed) for seed, name in enumerate(["a.bin", "b.bin", "c.bin"])}


async def fetch(o: Origin, key: str, cache: dict[str, Any], *, keep: bool = False
                ) -> tuple[bytes, CachingBackend]:
    """Read ``key`` whole through a caching backend; closed unless ``keep`` (entry stays in use)."""
    b = open_backend(o.uri, next(iter(o.storage.values())), cache=cache)
    assert isinstance(b, CachingBackend)
    info = await b.stat(key)
    buf = bytearray(info.size)
    await asyncio.wait_for(b.read_into(key, 0, memoryview(buf), version=info.version), 30)
    if not keep:
        await b.aclose()
    return bytes(buf), b


async def test_lru_entry_is_evicted_at_the_byte_bound(publish: Publish, tmp_path: Path) -> None:
    o = await publish("s3", OBJECTS)
    cache = {"dir": str(tmp_path / "c"), "max_bytes": 2 * OBJ + OBJ // 2}  # room for two
    for key in ("a.bin", "b.bin", "a.bin", "c.bin"):  # a is used again after b: b is the LRU
        data, b = await fetch(o, key, cache)
        assert data == OBJECTS[key]
        assert entry_bytes(tmp_path / "c") <= cache["max_bytes"]
    assert set(entries(tmp_path / "c")) == {"a.bin", "c.bin"}
    for key, origin_bytes in (("a.bin", 0), ("c.bin", 0), ("b.bin", OBJ)):
        _, b = await fetch(o, key, cache)
        assert b.counters.origin_bytes == origin_bytes, key


async def test_entry_in_use_is_never_evicted(publish: Publish, tmp_path: Path) -> None:
    o = await publish("s3", OBJECTS)
    cache = {"dir": str(tmp_path / "c"), "max_bytes": 2 * OBJ + OBJ // 2}
    await fetch(o, "a.bin", cache)
    await fetch(o, "b.bin", cache)
    _, holder = await fetch(o, "a.bin", cache, keep=True)  # a stays in use by this reader
    assert holder.counters.origin_bytes == 0
    await fetch(o, "b.bin", cache)  # b is used later: a is the LRU, but in use
    await fetch(o, "c.bin", cache)
    assert set(entries(tmp_path / "c")) == {"a.bin", "c.bin"}
    # With every entry in use there is no room: the read is served, and not cached.
    _, holder2 = await fetch(o, "c.bin", cache, keep=True)
    _, b = await fetch(o, "b.bin", cache)
    assert b.counters.outcomes == [] and b.counters.origin_bytes == OBJ
    assert set(entries(tmp_path / "c")) == {"a.bin", "c.bin"}
    await holder.aclose()
    await holder2.aclose()
    await fetch(o, "b.bin", cache)  # no longer in use: a (the LRU) goes now
    assert set(entries(tmp_path / "c")) == {"b.bin", "c.bin"}


# ------------------------------------------------------------------------- several processes

CHILD = r"""
import asyncio, json, os, sys
from backends import open_backend

uri, cache_dir, key, go = sys.argv[1:5]

async def main():
    b = open_backend(uri, {"chunk_bytes": 256 << 10, "concurrency": 4},
                     cache={"dir": cache_dir, "max_bytes": 1 << 30})
    print("ready", flush=True)
    while not os.path.exists(go):
        await asyncio.sleep(0.002)
    try:
        info = await b.stat(key)
        buf = bytearray(info.size)
        await asyncio.wait_for(b.read_into(key, 0, memoryview(buf), version=info.version), 60)
    finally:
        await b.aclose()
    print(json.dumps({"outcomes": b.counters.outcomes, "origin_bytes": b.counters.origin_bytes,
                      "sha256": __import__("hashlib").sha256(buf).hexdigest()}), flush=True)

asyncio.run(main())
"""


async def test_two_processes_filling_one_entry_leave_one_valid_entry(publish: Publish,
                                                                     tmp_path: Path) -> None:
    data = payload(2 * MiB + 5, 7)
    # 4 MiB/s shared: both fills take about a second, so both start before either commits.
    o = await publish("nginx", {"w.bin": data}, bandwidth_bps=4 * MiB)
    cache_dir, go = tmp_path / "cache", tmp_path / "go"
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, o.uri, str(cache_dir), "w.bin", str(go), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.stdout is not None
        assert (await asyncio.wait_for(p.stdout.readline(), 30)).strip() == b"ready"
    go.touch()
    results = []
    for p in procs:
        out, _ = await asyncio.wait_for(p.communicate(), 60)
        assert p.returncode == 0
        results.append(json.loads(out.splitlines()[-1]))
    digest = hashlib.sha256(data).hexdigest()
    assert all(r["sha256"] == digest and r["origin_bytes"] == len(data) for r in results), results
    assert sorted(r["outcomes"][0] for r in results) == ["committed", "lost"], results
    (entry,) = (cache_dir / "entries").iterdir()
    assert (entry / "data").read_bytes() == data
    assert json.loads((entry / "meta.json").read_bytes())["size"] == len(data)
    assert not list((cache_dir / "tmp").iterdir())
    got, b = await fetch(o, "w.bin", {"dir": str(cache_dir), "max_bytes": 1 << 30})
    assert got == data and b.counters.origin_bytes == 0


# ------------------------------------------------------------------------- configuration


def test_cache_table_of_the_config(tmp_path: Path) -> None:
    cfg = parse_config({"cache": {"dir": str(tmp_path), "max_bytes": 5 << 30}})
    assert cfg.node_cache == {"dir": str(tmp_path), "max_bytes": 5 << 30}
    assert parse_config({}).node_cache == {}
    for bad in ({"max_bytes": 10}, {"dir": str(tmp_path), "max_bytes": 0},
                {"dir": str(tmp_path), "max_bytez": 10}, {"dir": 3}):
        with pytest.raises(ConfigError):
            parse_config({"cache": bad})


async def test_cancelled_fill_leaves_nothing_behind(publish: Publish, tmp_path: Path) -> None:
    data = payload(2 * MiB, 9)
    o = await publish("nginx", {"w.bin": data}, bandwidth_bps=2 * MiB)
    cache = {"dir": str(tmp_path / "c"), "max_bytes": 1 << 30}
    b = open_backend(o.uri, o.storage["http"], cache=cache)
    info = await b.stat("w.bin")
    buf = memoryview(bytearray(info.size))
    await b.read_into("w.bin", 0, buf[:4096], version=info.version)  # a fill now exists
    assert len(list((tmp_path / "c" / "tmp").iterdir())) == 1
    task = asyncio.ensure_future(b.read_into("w.bin", 4096, buf[4096:], version=info.version))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await b.aclose()
    assert not list((tmp_path / "c" / "tmp").iterdir()) and not list((tmp_path / "c" / "entries").iterdir())
    got, b = await fetch(o, "w.bin", cache)  # nothing left locked: the next fill commits
    assert got == data and b.counters.outcomes == ["committed"]
