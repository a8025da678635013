"""Every bad checkpoint or storage fault ends in its clear error: no hang, no leaked thread."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backends.memory import Faults, MemoryBackend
from cicada_async.engine.fetch import FetchScheduler, FetchSettings
from cicada_async.engine.runtime import Engine
from cicada_async.engine.executor import Executor
from cicada_async.engine.job import LoadOptions
from cicada_async.engine.pipeline import LoadRequest, cold_start
from protocols.errors import CheckpointError, IntegrityError, StorageError, StorageTimeout, WeightMismatch

from tests.fixtures.helpers import assert_equal_outputs, extra_threads, inputs_for, reference


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(d: Path, edit) -> None:  # type: ignore[no-untyped-def]
    sd = load_file(str(d / "model.safetensors"))
    sd = edit(dict(sd))
    save_file(sd, str(d / "model.safetensors"))


async def _infer_error(d: Path) -> Exception:
    before = set(threading.enumerate())
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        with pytest.raises(Exception) as ei:
            await asyncio.wait_for(inst.infer(inputs_for(d)), 30)
        assert inst.state == "unloaded"
        assert inst._model is None
    assert extra_threads(before) == []
    return ei.value


async def test_missing_tensor(model_dirs, tmp_path):
    d = _copy(model_dirs["tiny-bert"], tmp_path / "m")
    _rewrite(d, lambda sd: {k: v for k, v in sd.items() if "pooler.dense.weight" not in k})
    e = await _infer_error(d)
    assert isinstance(e, WeightMismatch) and "missing pooler.dense.weight" in str(e)


async def test_extra_tensor(model_dirs, tmp_path):
    d = _copy(model_dirs["tiny-bert"], tmp_path / "m")
    _rewrite(d, lambda sd: {**sd, "surprise.weight": torch.zeros(3)})
    e = await _infer_error(d)
    assert isinstance(e, WeightMismatch) and "unexpected surprise.weight" in str(e)


async def test_wrong_shape(model_dirs, tmp_path):
    d = _copy(model_dirs["tiny-mlp"], tmp_path / "m")
    _rewrite(d, lambda sd: {**sd, "up.weight": torch.zeros(5, 5)})
    e = await _infer_error(d)
    assert isinstance(e, WeightMismatch) and "wrong shape up.weight" in str(e)


async def test_truncated_file(model_dirs, tmp_path):
    d = _copy(model_dirs["tiny-gpt2"], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    e = await _infer_error(d)
    assert isinstance(e, CheckpointError) and "truncated" in str(e)


async def test_pickle_renamed_is_rejected(model_dirs, tmp_path):
    d = _copy(model_dirs["tiny-mlp"], tmp_path / "m")
    torch.save({"w": torch.zeros(3)}, d / "model.safetensors")
    e = await _infer_error(d)
    assert isinstance(e, CheckpointError)


async def test_no_config(tmp_path):
    (tmp_path / "m").mkdir()
    e = await _infer_error(tmp_path / "m")
    assert "neither config.json nor cicada.json" in str(e)


async def _cold(backend, inputs, **fetch):  # type: ignore[no-untyped-def]
    ex = Executor()
    ex.start()
    try:
        return await cold_start(backend, ex, FetchScheduler(4), LoadRequest(
            inputs=inputs, options=LoadOptions(read_bytes=16 << 10), fetch=FetchSettings(**fetch)))
    finally:
        ex.stop()


async def test_read_fails_midway(model_dirs):
    d = model_dirs["tiny-gpt2"]
    backend = MemoryBackend.from_dir(d, Faults(fail_after_bytes=200_000))
    before = set(threading.enumerate())
    with pytest.raises(StorageError, match="injected failure"):
        await asyncio.wait_for(_cold(backend, inputs_for(d)), 30)
    assert extra_threads(before) == []


async def test_stalled_read_times_out(model_dirs):
    d = model_dirs["tiny-gpt2"]
    backend = MemoryBackend.from_dir(d, Faults(stall_after_bytes=200_000))
    with pytest.raises(StorageTimeout):
        await asyncio.wait_for(_cold(backend, inputs_for(d), read_timeout_s=0.5), 30)


async def test_short_read_is_integrity_error(model_dirs):
    d = model_dirs["tiny-gpt2"]
    # Headers and small files (offset 0) come whole: only the weight reads are short.
    backend = MemoryBackend.from_dir(d, Faults(short_by=1, short_past_offset=0))
    with pytest.raises(IntegrityError, match="ended early"):
        await asyncio.wait_for(_cold(backend, inputs_for(d)), 30)


async def test_object_replaced_mid_load(model_dirs):
    d = model_dirs["tiny-gpt2"]
    backend = MemoryBackend.from_dir(d)
    raw = bytearray(backend.objects["model.safetensors"])
    raw[-1] ^= 0xFF
    # Replaced after exactly 12 reads: past the small files and headers, before the last
    # weight read (with 16 KiB reads there are dozens), whatever the machine's speed.
    backend.on_read = lambda n: backend.replace("model.safetensors", bytes(raw)) if n == 12 else None
    from protocols.errors import ObjectChanged

    with pytest.raises(ObjectChanged):
        await asyncio.wait_for(_cold(backend, inputs_for(d)), 30)
    assert backend.reads > 12


async def test_memory_backend_load_matches(model_dirs):
    d = model_dirs["tiny-llama"]
    inputs = inputs_for(d)
    _, out, _ = await _cold(MemoryBackend.from_dir(d, Faults(delay_s=0.001)), inputs)
    assert_equal_outputs(reference(d, inputs), out)


async def test_failed_load_can_be_retried(model_dirs, tmp_path):
    d = _copy(model_dirs["tiny-mlp"], tmp_path / "m")
    good = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(good[:-10])
    inputs = inputs_for(d)
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        with pytest.raises(CheckpointError):
            await inst.infer(inputs)
        assert inst.state == "unloaded" and inst.last_error
        (d / "model.safetensors").write_bytes(good)
        out = await inst.infer(inputs)
    assert_equal_outputs(reference(d, inputs), out)


def test_header_rules():
    from cicada_async.engine.headers import header_length, parse_header

    def hdr(obj) -> bytes:  # type: ignore[no-untyped-def]
        return json.dumps(obj).encode()

    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = hdr(ok)
    parse_header(raw, key="k", size=8 + len(raw) + 8)
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        parse_header(raw, key="k", size=8 + len(raw) + 9)
    with pytest.raises(CheckpointError, match="unknown dtype"):
        parse_header(hdr({"a": {"dtype": "X", "shape": [2], "data_offsets": [0, 8]}}), key="k", size=100)
    with pytest.raises(CheckpointError, match="needs"):
        parse_header(hdr({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), key="k", size=100)
    with pytest.raises(CheckpointError, match="duplicate"):
        parse_header(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', key="k", size=100)
    with pytest.raises(CheckpointError, match="exceeds"):
        header_length(struct.pack("<Q", 200_000_000), key="k", size=10**9)


async def test_bad_first_request_does_not_sink_the_load(model_dirs):
    d = model_dirs["tiny-gpt2"]
    inputs = inputs_for(d)
    async with Engine() as engine:
        inst = engine.instance("m", str(d))
        from protocols.errors import InferenceError

        with pytest.raises(InferenceError):
            await inst.infer({"input_ids": torch.zeros(1, 4, dtype=torch.float32)})
        await inst.load()
        assert inst.state == "ready" and inst.cold_starts == 1
        out = await inst.infer(inputs)
    assert_equal_outputs(reference(d, inputs), out)
