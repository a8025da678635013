"""Strict tensors at the front door (review findings F3, F8, F9, F10) on a real server process.

JSON leaves must match the datatype (no silent truncation of 1.5, no "2", no true as 1), flags
are booleans, unknown input and output names are 400s naming them, and non-finite outputs
travel as "NaN"/"Infinity"/"-Infinity" strings, never as a silent null.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from loadtest.soak import ServerProcess
from tests.service.rawhttp import infer_body, request, serve

INFER = "/v2/models/mlp/infer"


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cfg = (f'[server]\nshutdown_timeout_s = 2\n\n[models.mlp]\nuri = "{model_dirs["tiny-mlp"]}"\n'
           f'[models.conv]\nuri = "{model_dirs["tiny-convnet"]}"\n')
    with serve(cfg, tmp_path_factory.mktemp("tensors")) as s:
        status, _, body = request(s.port, "POST", INFER, infer_body([1, 2, 3]))
        assert status == 200, body  # cold start done once for the module
        yield s


def _post(server: ServerProcess, body: bytes) -> tuple[int, dict[str, str], bytes]:
    return request(server.port, "POST", INFER, body)


@pytest.mark.parametrize("data, fragment", [
    ([1.5, 2, 3], "float"),
    (["1", "2", "3"], "string"),
    ([True, False, True], "boolean"),
    ([1, 2, None], "null"),
    ([[1], 2, 3], ""),  # ragged: refused by numpy
])
def test_integer_input_refuses_non_integers(server: ServerProcess, data: list[object], fragment: str) -> None:
    status, headers, body = _post(server, infer_body(data))
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    msg = orjson.loads(body)["error"]
    assert "input_ids" in msg and fragment in msg, msg


def test_integer_input_exact_ints_still_answered(server: ServerProcess) -> None:
    status, _, body = _post(server, infer_body([1, 2, 3]))
    assert status == 200, body
    assert orjson.loads(body)["outputs"][0]["shape"] == [1, 3, 256]


@pytest.mark.parametrize("flag", ["false", 0, 1, "true", []])
def test_binary_data_output_must_be_boolean(server: ServerProcess, flag: object) -> None:
    status, headers, body = _post(server, infer_body([1, 2, 3], parameters={"binary_data_output": flag}))
    assert status == 400, (headers, body[:200])
    assert "binary_data_output" in orjson.loads(body)["error"]


def test_binary_data_false_means_json(server: ServerProcess) -> None:
    status, headers, _ = _post(server, infer_body([1, 2, 3], parameters={"binary_data_output": False}))
    assert status == 200 and headers["content-type"] == "application/json"
    status, headers, _ = _post(server, infer_body([1, 2, 3], parameters={"binary_data_output": True}))
    assert status == 200 and headers["content-type"] == "application/octet-stream"


def test_output_binary_data_must_be_boolean(server: ServerProcess) -> None:
    body = infer_body([1, 2, 3], outputs=[{"name": "output", "parameters": {"binary_data": "false"}}])
    status, _, out = _post(server, body)
    assert status == 400
    assert "binary_data" in orjson.loads(out)["error"]


def test_unknown_input_is_400_naming_it(server: ServerProcess) -> None:
    status, _, body = _post(server, infer_body([1, 2, 3], name="foo"))
    assert status == 400, body
    msg = orjson.loads(body)["error"]
    assert "'foo'" in msg and "TypeError" not in msg and "TiedMLP" not in msg, msg
    # The model is still fine for the next caller.
    assert _post(server, infer_body([1, 2, 3]))[0] == 200


def test_unknown_output_is_400_naming_it(server: ServerProcess) -> None:
    status, _, body = _post(server, infer_body([1, 2, 3], outputs=[{"name": "nope"}]))
    assert status == 400
    assert "'nope'" in orjson.loads(body)["error"]


CONV = "/v2/models/conv/infer"
PIXELS = 3 * 16 * 16


@pytest.mark.parametrize("leaf, fragment", [("2", "string '2'"), (True, "boolean"), (None, "null")])
def test_fp_input_refuses_strings_and_booleans(server: ServerProcess, leaf: object, fragment: str) -> None:
    data = [0.5] * (PIXELS - 1) + [leaf]
    status, _, body = request(server.port, "POST", CONV, infer_body(data, "FP32", [1, 3, 16, 16], "x"))
    assert status == 400, body
    msg = orjson.loads(body)["error"]
    assert "'x'" in msg and "FP32" in msg and fragment in msg, msg


def test_fp_input_takes_ints_and_floats(server: ServerProcess) -> None:
    data = [1, 0.5] * (PIXELS // 2)
    status, _, body = request(server.port, "POST", CONV, infer_body(data, "FP32", [1, 3, 16, 16], "x"))
    assert status == 200, body


def test_non_finite_outputs_are_strings_end_to_end(server: ServerProcess) -> None:
    """A forward that yields NaN/Inf answers them as "NaN"/"Infinity"/"-Infinity", never null."""
    data = ["Infinity", "-Infinity"] * (PIXELS // 2)
    status, headers, body = request(server.port, "POST", CONV, infer_body(data, "FP32", [1, 3, 16, 16], "x"))
    assert status == 200 and headers["content-type"] == "application/json", body
    leaves = orjson.loads(body)["outputs"][0]["data"]
    assert None not in leaves
    assert set(leaves) & {"NaN", "Infinity", "-Infinity"}, leaves[:10]
    assert all(isinstance(x, float) or x in ("NaN", "Infinity", "-Infinity") for x in leaves)


def test_non_finite_outputs_have_one_json_form() -> None:
    import math

    import torch

    from protocols import v2

    out, hl = v2.encode_response("m", {"y": torch.tensor([1.0, math.nan, math.inf, -math.inf])})
    assert hl is None
    data = orjson.loads(out)["outputs"][0]["data"]
    assert data == [1.0, "NaN", "Infinity", "-Infinity"]  # never null
    back = v2.decode_response(out)["outputs"]["y"]
    assert back[0] == 1.0 and math.isnan(back[1]) and back[2] == math.inf and back[3] == -math.inf
