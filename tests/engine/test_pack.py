"""pack(): reorder a safetensors checkpoint, check it with safetensors itself, and the manifest."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cicada_async.engine.manifest import MANIFEST_NAME, load_manifest, verify
from cicada_async.engine.pack import DATA_ALIGN, INDEX_NAME, pack
from protocols.errors import CheckpointError, IntegrityError

pytestmark = pytest.mark.timeout(60)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "layers.0.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layers.0.bias": torch.randn(16, generator=g).half(),
        "layers.1.weight": torch.randn(16, 16, generator=g),
        "layers.1.bias": torch.randn(16, generator=g),
        "head.weight": torch.randn(7, 16, generator=g).double(),
        "position_ids": torch.arange(33, dtype=torch.int64),
        "mask": torch.rand(5, 3, generator=g) > 0.5,
        "scale": torch.tensor(0.5),  # 0-d
        "empty": torch.empty(0, 4),
    }


def file_order(path: Path) -> list[str]:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in out
                out[name] = f.get_tensor(name)
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def single(tmp_path: Path) -> Path:
    src = tmp_path / "single"
    src.mkdir()
    save_file(tensors(), str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text('{"model_type": "tiny"}')
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return src


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    src = tmp_path / "sharded"
    src.mkdir()
    ts = tensors()
    names = list(ts)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, part in shards.items():
        save_file({n: ts[n] for n in part}, str(src / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (src / INDEX_NAME).write_text(json.dumps(index))
    (src / "config.json").write_text("{}")
    return src


EXEC_ORDER = [
    "position_ids",
    "embed.weight",
    "layers.0.weight",
    "layers.0.bias",
    "layers.1.weight",
    "layers.1.bias",
    "head.weight",
]


def test_single_file_in_execution_order(single: Path, tmp_path: Path) -> None:
    dst = tmp_path / "packed"
    manifest = pack(single, dst, EXEC_ORDER, buffer_bytes=100)  # tiny buffer: many pieces
    packed = dst / "model.safetensors"
    assert_same(load_all(single), load_all(dst))
    # Listed names first in the given order, the rest after them in file order.
    rest = [n for n in file_order(single / "model.safetensors") if n not in EXEC_ORDER]
    assert file_order(packed) == EXEC_ORDER + rest
    assert manifest["order"] == EXEC_ORDER + rest
    with safe_open(str(packed), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    (n,) = struct.unpack("<Q", packed.read_bytes()[:8])
    assert (8 + n) % DATA_ALIGN == 0
    assert (dst / "config.json").read_bytes() == (single / "config.json").read_bytes()
    assert (dst / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"


def test_default_keeps_file_order(single: Path, tmp_path: Path) -> None:
    pack(single, tmp_path / "packed")
    src_order = file_order(single / "model.safetensors")
    assert file_order(tmp_path / "packed" / "model.safetensors") == src_order
    assert_same(load_all(single), load_all(tmp_path / "packed"))


def test_manifest_describes_every_file(single: Path, tmp_path: Path) -> None:
    dst = tmp_path / "packed"
    manifest = pack(single, dst, EXEC_ORDER)
    on_disk = load_manifest((dst / MANIFEST_NAME).read_bytes())
    assert on_disk == manifest
    keys = {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == keys - {MANIFEST_NAME}
    for key, entry in manifest["files"].items():
        data = (dst / key).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        verify(key, data, manifest)
        verify(key, memoryview(bytearray(data)), manifest)


def test_sharded_checkpoint(sharded: Path, tmp_path: Path) -> None:
    dst = tmp_path / "packed"
    order = list(reversed(EXEC_ORDER))
    manifest = pack(sharded, dst, order)
    assert_same(load_all(sharded), load_all(dst))
    index = json.loads((dst / INDEX_NAME).read_text())
    first = dst / "model-00001-of-00002.safetensors"
    second = dst / "model-00002-of-00002.safetensors"
    # Shards are refilled in execution order: reading shard 1 then 2 follows the order.
    assert file_order(first) + file_order(second) == manifest["order"]
    assert manifest["order"][: len(order)] == order
    assert set(index["weight_map"]) == set(tensors())
    for name, file in index["weight_map"].items():
        with safe_open(str(dst / file), framework="pt") as f:
            assert name in f.keys()
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors().values()
    )
    assert INDEX_NAME in manifest["files"] and "config.json" in manifest["files"]


def test_verify_rejects_wrong_bytes(single: Path, tmp_path: Path) -> None:
    manifest = pack(single, tmp_path / "packed")
    data = bytearray((tmp_path / "packed" / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    with pytest.raises(IntegrityError, match="SHA-256"):
        verify("model.safetensors", data, manifest)
    with pytest.raises(IntegrityError, match="bytes"):
        verify("model.safetensors", data[:-1], manifest)
    with pytest.raises(IntegrityError, match="not in"):
        verify("other.safetensors", data, manifest)


@pytest.mark.parametrize(
    "order",
    [["embed.weight", "embed.weight"], ["no.such.tensor"]],
)
def test_bad_orders(single: Path, tmp_path: Path, order: list[str]) -> None:
    with pytest.raises(CheckpointError):
        pack(single, tmp_path / "packed", order)


def test_refuses_packing_in_place(single: Path) -> None:
    with pytest.raises(CheckpointError):
        pack(single, single)


def test_destination_inside_source(single: Path) -> None:
    dst = single / "packed"
    manifest = pack(single, dst)
    assert not any(k.startswith("packed/") for k in manifest["files"])
    assert_same(load_all(single), load_all(dst))


def test_malformed_source_is_rejected(tmp_path: Path) -> None:
    src = tmp_path / "bad"
    src.mkdir()
    save_file({"a": torch.zeros(4)}, str(src / "model.safetensors"))
    with open(src / "model.safetensors", "ab") as f:
        f.write(b"trailing")  # data no longer ends at the file's end
    with pytest.raises(CheckpointError):
        pack(src, tmp_path / "out")


GOOD_DIGEST = "0" * 64


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"files": []}',
        b'{"files": {"a": {"size": 1, "sha256": "' + GOOD_DIGEST.encode() + b'"}, "a": {}}}',
        b'{"files": {"../x": {"size": 1, "sha256": "' + GOOD_DIGEST.encode() + b'"}}}',
        b'{"files": {"x": {"size": -1, "sha256": "' + GOOD_DIGEST.encode() + b'"}}}',
        b'{"files": {"x": {"size": 1, "sha256": "zz"}}}',
        b'{"files": {}, "order": [1]}',
    ],
)
def test_load_manifest_rejects(raw: bytes) -> None:
    with pytest.raises(CheckpointError):
        load_manifest(raw)


def _raw_file(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_pack_copies_dtypes_the_loader_does_not_map(tmp_path: Path) -> None:
    """pack checks headers with the loader's parser, but copies any dtype the format defines."""
    src = tmp_path / "src"
    src.mkdir()
    data = bytes(range(19))
    _raw_file(src / "model.safetensors", {
        "__metadata__": {"format": "pt"},
        "c": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]},
        "q": {"dtype": "F4", "shape": [2, 3], "data_offsets": [16, 19]},  # two to a byte
    }, data)
    pack(src, tmp_path / "out", ["q", "c"])
    out = (tmp_path / "out" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", out[:8])
    header = json.loads(out[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["q"] == {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}
    assert header["c"] == {"dtype": "C64", "shape": [2], "data_offsets": [3, 19]}
    assert out[8 + n :] == data[16:] + data[:16]


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        ({"a": {"dtype": "X", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), "unknown dtype"),
        ({"q": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, bytes(1), "needs 1.5"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, bytes(3), "unexpected bytes"),
        ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2],
          "data_offsets": [1, 3]}}, bytes(3), "overlaps"),
    ],
)
def test_malformed_headers_name_the_file(tmp_path: Path, header: dict[str, object], data: bytes,
                                         needle: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _raw_file(src / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=needle) as e:
        pack(src, tmp_path / "out")
    assert str(src / "model.safetensors") in str(e.value)
