"""The V2 codec on its own: every datatype both ways, and each malformed request refused."""

from __future__ import annotations

import orjson
import pytest
import torch

from protocols import v2
from protocols.errors import BadRequest

ALL = list(v2.DATATYPES)
JSON_OK = [d for d in ALL if d not in v2.BINARY_ONLY]


def sample(datatype: str) -> torch.Tensor:
    t = torch.tensor([[0, 1, 2], [3, 4, 5]])
    if datatype in ("FP16", "BF16", "FP32", "FP64"):
        return (t.to(torch.float64) / 3 - 0.5).to(v2.DATATYPES[datatype])
    if datatype == "BOOL":
        return t % 2 == 1
    return t.to(v2.DATATYPES[datatype])


@pytest.mark.parametrize("datatype", ALL)
def test_binary_roundtrip(datatype: str) -> None:
    t = sample(datatype)
    body, hl = v2.encode_request({"x": t}, binary=True)
    req = v2.decode_request(body, hl)
    assert req.inputs["x"].dtype == t.dtype and torch.equal(req.inputs["x"], t)
    body, hl = v2.encode_response("m", {"y": t}, binary_default=True, request_id="r1")
    doc = v2.decode_response(body, hl)
    assert doc["id"] == "r1" and torch.equal(doc["outputs"]["y"], t)


@pytest.mark.parametrize("datatype", JSON_OK)
def test_json_roundtrip(datatype: str) -> None:
    t = sample(datatype)
    body, hl = v2.encode_request({"x": t}, binary=False)
    assert hl is None
    assert torch.equal(v2.decode_request(body).inputs["x"], t)
    body, hl = v2.encode_response("m", {"y": t})
    assert hl is None
    assert torch.equal(v2.decode_response(body)["outputs"]["y"], t)


def test_nested_json_data_and_envelope() -> None:
    body = orjson.dumps({
        "id": "abc", "parameters": {"priority": 2, "timeout": 1500, "binary_data_output": True},
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}],
    })
    req = v2.decode_request(body)
    assert req.id == "abc" and req.priority == 2 and req.timeout_s == pytest.approx(0.0015)
    assert req.binary_output is True
    assert torch.equal(req.inputs["x"], torch.tensor([[1, 2], [3, 4]]))
    assert [(o.name, o.binary) for o in req.outputs or []] == [("y", False), ("z", None)]


def test_half_precision_outputs_always_binary() -> None:
    t = torch.ones(2, dtype=torch.float16)
    body, hl = v2.encode_response("m", {"y": t, "n": torch.tensor([1])})
    assert hl is not None
    doc = v2.decode_response(body, hl)
    assert torch.equal(doc["outputs"]["y"], t) and doc["outputs"]["n"].tolist() == [1]


def test_mixed_binary_and_json_inputs() -> None:
    a = torch.arange(4, dtype=torch.float32)
    header = orjson.dumps({"inputs": [
        {"name": "a", "shape": [4], "datatype": "FP32", "parameters": {"binary_data_size": 16}},
        {"name": "b", "shape": [1], "datatype": "INT32", "data": [7]},
    ]})
    req = v2.decode_request(header + a.numpy().tobytes(), len(header))
    assert torch.equal(req.inputs["a"], a) and req.inputs["b"].tolist() == [7]


def _bad(doc: object, blob: bytes = b"", hl: int | None = None) -> str:
    header = orjson.dumps(doc)
    with pytest.raises(BadRequest) as e:
        v2.decode_request(header + blob, hl if hl is not None else (len(header) if blob else None))
    return str(e.value)


@pytest.mark.parametrize("doc, blob, needle", [
    ([1], b"", "JSON object"),
    ({"inputs": []}, b"", "non-empty"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "STRING", "data": [1]}]}, b"", "unsupported datatype"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, b"", "unsupported datatype"),
    ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, b"", "non-negative"),
    ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}, b"", "elements"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP16", "data": [1]}]}, b"", "no JSON form"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": ["a"]}]}, b"", "does not fit"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, b"", "needs 'data'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                 {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, b"", "twice"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
     b"\0" * 4, "past the end"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
     b"\0" * 4, "needs 8 bytes"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
     b"\0" * 8, "not claimed"),
    ({"parameters": {"priority": -1}, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
     b"", None),
    ({"parameters": {"timeout": "soon"}, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
     b"", None),
])
def test_malformed_requests(doc: object, blob: bytes, needle: str | None) -> None:
    if needle is None:  # envelope errors surface when the parameter is read
        req = v2.decode_request(orjson.dumps(doc))
        with pytest.raises(BadRequest):
            _ = req.priority, req.timeout_s
        return
    assert needle in _bad(doc, blob)


def test_bad_header_length_and_json() -> None:
    with pytest.raises(BadRequest, match="does not fit"):
        v2.decode_request(b"{}", 10)
    with pytest.raises(BadRequest, match="valid JSON"):
        v2.decode_request(b"{nope")


def test_unknown_requested_output() -> None:
    with pytest.raises(BadRequest, match="unknown output"):
        v2.encode_response("m", {"y": torch.ones(1)}, requested=[v2.RequestedOutput("nope")])


def test_binary_bool_nonzero_bytes_are_true() -> None:
    header = orjson.dumps({"inputs": [{"name": "b", "shape": [3], "datatype": "BOOL",
                                       "parameters": {"binary_data_size": 3}}]})
    req = v2.decode_request(header + bytes([0, 1, 7]), len(header))
    assert req.inputs["b"].tolist() == [False, True, True]
