"""End-to-end cold starts through the Engine from S3 (moto) and HTTP origins (aiohttp, nginx).

Every load either returns outputs exactly equal (``torch.equal``) to the plain local load of
the same weights, or fails with a ``CicadaError`` subclass within its deadline. After a
failure the instance is back to "unloaded" and a retry without the fault succeeds.

Faults come from ``tests/fixtures/faultproxy.py``, placed between the engine and the real server, and
are armed to fire on the weight reads (after the spec and header reads of the load), so the
pipelined forward is already running when they hit.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from cicada_async.engine.runtime import Engine
from cicada_async.models.catalogue import make_model
from protocols.errors import (
    CicadaError,
    IntegrityError,
    ObjectChanged,
    StorageError,
    StorageTimeout,
)
from tests.fixtures.faultproxy import Fault, FaultProxy
from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference

pytestmark = pytest.mark.timeout(120)

MODELS = ["tiny-gpt2", "tiny-llama", "tiny-resnet", "tiny-gpt2-sharded"]
ORIGINS = ["s3", "aiohttp", "nginx"]

# Small reads and chunks so that a tiny model still makes dozens of ranged requests.
READ_BYTES = 64 << 10
REMOTE: dict[str, Any] = {
    "chunk_bytes": 32 << 10,
    "concurrency": 4,
    "connect_timeout_s": 2,
    "read_timeout_s": 0.5,
    "max_attempts": 3,
    "resume_attempts": 2,
    "backoff_s": 0.01,
    "backoff_max_s": 0.05,
}
# Far above what any case needs (a few seconds), far below a hang.
DEADLINE_S = 30.0


# ------------------------------------------------------------------------------- fixtures


@dataclass
class Remote:
    """One model directory published on one origin (optionally behind a proxy)."""

    kind: str  # "s3", "aiohttp" or "nginx"
    uri: str
    storage: dict[str, dict[str, Any]]
    replace: Callable[[str, bytes], None]  # (key, data): replace an object at the origin


_REFERENCES: dict[str, dict[str, torch.Tensor]] = {}


def expected_outputs(model_dir: Path) -> dict[str, torch.Tensor]:
    key = str(model_dir)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference(model_dir, inputs_for(model_dir))
    return _REFERENCES[key]


@pytest.fixture
def publish(
    request: pytest.FixtureRequest, served_root: Path
) -> Iterator[Callable[[str, Path, str | None], Remote]]:
    """``publish(kind, model_dir, proxy_url=None) -> Remote``: a fresh copy on that origin."""
    cleanups: list[Callable[[], None]] = []

    def make(kind: str, model_dir: Path, proxy_url: str | None = None) -> Remote:
        files = sorted(p for p in model_dir.iterdir() if p.is_file())
        if kind == "s3":
            import boto3

            endpoint = request.getfixturevalue("moto_endpoint")
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            bucket = f"engine-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=bucket)
            prefix = f"models/{model_dir.name}"
            for f in files:
                client.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())

            def replace(key: str, data: bytes) -> None:
                client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)

            def cleanup() -> None:
                for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
                client.delete_bucket(Bucket=bucket)
                client.close()

            cleanups.append(cleanup)
            settings = {**REMOTE, "endpoint_url": proxy_url or endpoint, "region": "us-east-1",
                        "op_timeout_s": 10}
            return Remote(kind, f"s3://{bucket}/{prefix}", {"s3": settings}, replace)

        base = request.getfixturevalue(f"{kind}_origin")
        directory = served_root / f"engine-{uuid.uuid4().hex[:12]}"
        directory.mkdir()
        for f in files:
            shutil.copyfile(f, directory / f.name)
        cleanups.append(lambda: shutil.rmtree(directory, ignore_errors=True))

        def replace_file(key: str, data: bytes) -> None:
            from tests.fixtures.storage import write_replacing

            write_replacing(directory / key, data)

        uri = f"{proxy_url or base}/{directory.name}/"
        return Remote(kind, uri, {"http": dict(REMOTE)}, replace_file)

    yield make
    for c in cleanups:
        c()


def upstream_of(kind: str, request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("moto_endpoint" if kind == "s3" else f"{kind}_origin")


def engine_for(remote: Remote) -> Engine:
    return Engine(storage=remote.storage, read_bytes=READ_BYTES, read_timeout_s=20.0,
                  load_timeout_s=DEADLINE_S)


async def infer_once(remote: Remote, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    async with engine_for(remote) as engine:
        inst = engine.instance("m", remote.uri)
        out = await asyncio.wait_for(inst.infer(inputs), DEADLINE_S)
        assert inst.state == "ready"
        return out


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ORIGINS)
@pytest.mark.parametrize("name", MODELS)
async def test_remote_cold_start_exact(name: str, kind: str, model_dirs: dict[str, Path],
                                       publish: Any) -> None:
    model_dir = model_dirs[name]
    remote = publish(kind, model_dir)
    inputs = inputs_for(model_dir)
    expected = expected_outputs(model_dir)
    out = await infer_once(remote, inputs)
    assert_equal_outputs(out, expected)


@pytest.mark.parametrize("kind", ["s3", "aiohttp"])
async def test_warm_infer_after_remote_cold_start(kind: str, model_dirs: dict[str, Path],
                                                  publish: Any) -> None:
    """The second request on the loaded instance (no gates) matches the local load too."""
    model_dir = model_dirs["tiny-llama"]
    remote = publish(kind, model_dir)
    async with engine_for(remote) as engine:
        inst = engine.instance("m", remote.uri)
        for seed in (0, 1):
            inputs = inputs_for(model_dir, seed=seed)
            out = await asyncio.wait_for(inst.infer(inputs), DEADLINE_S)
            assert_equal_outputs(out, reference(model_dir, inputs))
        assert inst.cold_starts == 1


# ------------------------------------------------------------------------------- fault matrix

OK = None
Outcome = type[CicadaError] | None

# name -> (fault, outcome on S3, outcome on HTTP). Faults fire on weight reads ("after" is
# added to the number of GETs a load makes before its first weight read).
FAULTS: dict[str, tuple[Callable[[], Fault], Outcome, Outcome]] = {
    "drop mid-body once": (lambda: Fault("drop", after=2), OK, OK),
    "drop mid-body always": (lambda: Fault("drop", after=2, times=-1), StorageError, StorageError),
    "500 then success": (lambda: Fault("status", status=500, after=1), OK, OK),
    "503 x2 then success": (lambda: Fault("status", status=503, times=2, after=1), OK, OK),
    "503 always": (lambda: Fault("status", status=503, times=-1, after=1), StorageError, StorageError),
    "SlowDown x2 then success": (lambda: Fault("slowdown", times=2, after=3), OK, OK),
    "body one byte short once": (lambda: Fault("short", after=2), OK, OK),
    "body one byte short always": (lambda: Fault("short", times=-1, after=2), IntegrityError, IntegrityError),
    "200 ignoring Range": (lambda: Fault("ignore_range", times=-1, after=1), IntegrityError, OK),
    "object replaced mid-load": (lambda: Fault("replace", after=2), ObjectChanged, ObjectChanged),
    "stall after headers once": (lambda: Fault("stall", stall_s=5, after=2), OK, OK),
    "stall after headers always": (lambda: Fault("stall", stall_s=30, times=-1, weights_only=True),
                                   StorageTimeout, StorageTimeout),
    "stall before headers once": (lambda: Fault("stall", stall_s=5, stall_before_headers=True, after=2), OK, OK),
}


def prelude_gets(log: list[Any]) -> int:
    """GETs a load makes before its first weight read: small files and header probes."""
    gets = [e for e in log if e.method == "GET"]
    for i, e in enumerate(gets):
        rng = e.headers.get("Range", "")
        if ".safetensors" in e.path and rng and not rng.startswith("bytes=0-"):
            return i
    raise AssertionError("no weight read seen")


@pytest.mark.parametrize("kind", ["s3", "aiohttp", "nginx"])
@pytest.mark.parametrize("fault_name", list(FAULTS))
async def test_engine_fault(fault_name: str, kind: str, model_dirs: dict[str, Path], publish: Any,
                            fault_proxy_factory: Any, request: pytest.FixtureRequest) -> None:
    make, on_s3, on_http = FAULTS[fault_name]
    expected = on_s3 if kind == "s3" else on_http
    name = "tiny-gpt2-sharded" if kind == "aiohttp" else "tiny-gpt2"
    model_dir = model_dirs[name]
    proxy: FaultProxy = await fault_proxy_factory(upstream_of(kind, request))
    remote = publish(kind, model_dir, proxy.url)
    inputs = inputs_for(model_dir)
    want = expected_outputs(model_dir)

    # A clean load through the proxy: correct, and tells where the weight reads begin.
    assert_equal_outputs(await infer_once(remote, inputs), want)
    prelude = prelude_gets(proxy.log)
    weights = [f for f in sorted(p.name for p in model_dir.iterdir()) if f.endswith(".safetensors")]

    fault = make()
    if not fault.weights_only:  # counted from the first weight read
        fault.after += prelude
    if fault.mode == "replace":
        other = make_model("tiny-gpt2", model_dir.parent / f"{name}-replacement-{kind}", seed=99,
                           max_shard_bytes=200_000 if name.endswith("sharded") else None)

        async def replace() -> None:
            for w in weights:
                data = (other / w).read_bytes()
                assert len(data) == (model_dir / w).stat().st_size
                await asyncio.to_thread(remote.replace, w, data)

        fault.on_request = replace

    async with engine_for(remote) as engine:
        inst = engine.instance("m", remote.uri)
        proxy.log.clear()
        proxy.fault = fault
        started = time.monotonic()
        try:
            out = await asyncio.wait_for(inst.infer(inputs), DEADLINE_S)
        except TimeoutError:
            pytest.fail(f"the load hung for {DEADLINE_S} s under {fault_name!r}")
        except CicadaError as e:
            elapsed = time.monotonic() - started
            assert expected is not OK, f"{fault_name}: expected success, got {e!r}"
            assert isinstance(e, expected), f"{fault_name}: expected {expected.__name__}, got {e!r}"
            assert elapsed < DEADLINE_S / 2, f"failing took {elapsed:.1f} s"
            assert inst.state == "unloaded" and inst.last_error
        else:
            assert expected is OK, f"{fault_name}: expected {expected.__name__}, the load succeeded"
            assert inst.state == "ready"
            assert_equal_outputs(out, want)
        assert fault.applied >= 1, "the fault never fired: the case tested nothing"

        # Without the fault (and with the original objects back) the same instance loads.
        proxy.fault = None
        if fault.mode == "replace":
            for w in weights:
                await asyncio.to_thread(remote.replace, w, (model_dir / w).read_bytes())
        if inst.state != "ready":
            out = await asyncio.wait_for(inst.infer(inputs), DEADLINE_S)
            assert inst.state == "ready"
            assert_equal_outputs(out, want)


async def _late_failure(model_dirs: dict[str, Path], publish: Any, fault_proxy_factory: Any,
                        request: pytest.FixtureRequest) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """A bandwidth-capped S3 load that fails late (403 on every GET after 2/3 of them), while
    the first request's forward waits in a gate and a second request has joined the load.
    Returns both results and the retry's outputs."""
    model_dir = model_dirs["tiny-llama"]
    proxy: FaultProxy = await fault_proxy_factory(upstream_of("s3", request), bandwidth_bps=4 << 20)
    remote = publish("s3", model_dir, proxy.url)
    inputs = inputs_for(model_dir)
    assert_equal_outputs(await infer_once(remote, inputs), expected_outputs(model_dir))
    prelude = prelude_gets(proxy.log)
    n_gets = sum(1 for e in proxy.log if e.method == "GET")
    proxy.log.clear()
    proxy.fault = Fault("status", status=403, times=-1, after=prelude + (n_gets - prelude) * 2 // 3)
    async with engine_for(remote) as engine:
        inst = engine.instance("m", remote.uri)
        first = asyncio.ensure_future(inst.infer(inputs))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(inst.infer(inputs))
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), DEADLINE_S)
        assert inst.state == "unloaded"
        proxy.fault = None
        retry = await asyncio.wait_for(inst.infer(inputs), DEADLINE_S)
    return results, retry


async def test_failure_during_gated_forward_then_retry(model_dirs: dict[str, Path], publish: Any,
                                                       fault_proxy_factory: Any,
                                                       request: pytest.FixtureRequest) -> None:
    """Both requests fail with a CicadaError (no hang, no outputs); the retry is exact."""
    results, retry = await _late_failure(model_dirs, publish, fault_proxy_factory, request)
    assert isinstance(results[0], StorageError), results
    assert isinstance(results[1], CicadaError), results
    assert_equal_outputs(retry, expected_outputs(model_dirs["tiny-llama"]))


async def test_joined_request_gets_the_load_error(model_dirs: dict[str, Path], publish: Any,
                                                  fault_proxy_factory: Any,
                                                  request: pytest.FixtureRequest) -> None:
    results, _ = await _late_failure(model_dirs, publish, fault_proxy_factory, request)
    assert all(isinstance(r, StorageError) for r in results), results
