"""The V2 (Open Inference Protocol) wire codec: JSON tensors and the binary tensor extension.

Pure functions from bytes to torch tensors and back; no HTTP here. Every malformed request
raises ``BadRequest`` with a message meant for the caller.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import torch

from protocols.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"

# V2 datatype -> torch dtype. BYTES (length-prefixed strings) has no tensor form in a forward
# pass, so it is refused rather than half supported.
DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
TORCH_TO_V2: dict[torch.dtype, str] = {v: k for k, v in DATATYPES.items()}
# numpy dtypes for the JSON path (numpy parses nested lists fast and orjson serialises numpy
# arrays natively). FP16 and BF16 have no JSON form in the protocol.
_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
}
BINARY_ONLY = frozenset({"FP16", "BF16"})
_MAX_DIMS = 32

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("the V2 binary codec assumes a little-endian host")


def itemsize(datatype: str) -> int:
    return torch.empty((), dtype=DATATYPES[datatype]).element_size()


@dataclass
class RequestedOutput:
    """One entry of the request's ``outputs`` list."""

    name: str
    binary: bool | None = None  # None: follow the request-level default


@dataclass
class InferRequest:
    """A decoded infer request: tensors keyed by input name, plus the envelope."""

    inputs: dict[str, torch.Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: return every output
    binary_output: bool = False  # request-level ``binary_data_output``

    @property
    def priority(self) -> int:
        """``parameters.priority``: 1 is the most urgent; 0 or absent means the model default."""
        value = self.parameters.get("priority", 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise BadRequest(f"parameters.priority must be an integer in [0, 2^31), got {value!r}")
        return value

    @property
    def timeout_s(self) -> float | None:
        """``parameters.timeout`` (microseconds, as tritonclient sends it) in seconds."""
        value = self.parameters.get("timeout")
        if value is None or value == 0:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise BadRequest(f"parameters.timeout must be a positive number of microseconds, got {value!r}")
        return float(value) / 1e6


def parse_shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_DIMS:
        raise BadRequest(f"{where}: shape must be a list of at most {_MAX_DIMS} integers")
    for d in raw:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise BadRequest(f"{where}: shape dimensions must be non-negative integers, got {raw!r}")
    return tuple(raw)


def _parse_header(header: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def _params(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(f"{where}: parameters must be an object")
    return raw


# JSON spellings of non-finite floats (JavaScript's and Python's names): JSON numbers cannot
# carry them, and orjson would silently write null, which reads back as neither NaN nor Inf.
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _check_leaves(data: list[Any], datatype: str, where: str) -> None:
    """Refuse leaves numpy would coerce: 1.5, "2" or true as an integer, 1 as a BOOL."""
    types: set[type] = set()
    strings: set[str] = set()
    stack = [data]
    while stack:  # iterative: no recursion on deep input
        kinds = set(map(type, item := stack.pop()))
        if list in kinds or str in kinds:
            stack.extend(x for x in item if type(x) is list)
            strings.update(x for x in item if type(x) is str)
            kinds.discard(list)
        types |= kinds
    fp = datatype in ("FP32", "FP64")
    allowed = {bool} if datatype == "BOOL" else {int, float, str} if fp else {int}
    what = "JSON booleans" if datatype == "BOOL" else "JSON integers" if not fp else "numbers"
    if types - allowed or strings - NONFINITE.keys():
        names = {bool: "boolean", int: "integer", float: "float", str: "string", type(None): "null", dict: "object"}
        got = ", ".join(sorted(names.get(t, t.__name__) for t in types - allowed)) or \
            f"string {min(strings - NONFINITE.keys())[:32]!r}"
        hint = ' (or "NaN", "Infinity", "-Infinity")' if fp else ""
        raise BadRequest(f"{where}: data does not fit {datatype}: leaves must be {what}{hint}, got {got}")


def _json_tensor(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if datatype in BINARY_ONLY:
        raise BadRequest(f"{where}: {datatype} has no JSON form; send it as binary data")
    if not isinstance(data, list):
        raise BadRequest(f"{where}: data must be a list")
    _check_leaves(data, datatype, where)
    try:
        arr = np.asarray(data, dtype=_NUMPY[datatype])
    except (ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"{where}: data does not fit {datatype}: {e}") from None
    if arr.size != math.prod(shape):
        raise BadRequest(f"{where}: {arr.size} elements in data but shape {list(shape)} needs {math.prod(shape)}")
    return torch.from_numpy(np.ascontiguousarray(arr.reshape(shape)))


def binary_tensor(
    buf: bytearray, offset: int, nbytes: int, datatype: str, shape: tuple[int, ...], where: str
) -> torch.Tensor:
    count = math.prod(shape)
    if nbytes != count * itemsize(datatype):
        raise BadRequest(
            f"{where}: binary_data_size {nbytes} but shape {list(shape)} of {datatype} needs {count * itemsize(datatype)} bytes"
        )
    if count == 0:
        return torch.empty(shape, dtype=DATATYPES[datatype])
    if datatype == "BOOL":
        # Any non-zero byte is true; viewing arbitrary bytes as torch.bool is undefined.
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=count, offset=offset)
        return (raw != 0).reshape(shape)
    # frombuffer shares memory with ``buf`` (a private copy of the body), so no second copy.
    return torch.frombuffer(buf, dtype=DATATYPES[datatype], count=count, offset=offset).reshape(shape)


def to_bytes(t: torch.Tensor) -> bytes:
    """A contiguous CPU tensor's raw little-endian bytes; BOOL as one byte per element."""
    raw = (t.to(torch.uint8) if t.dtype == torch.bool else t).reshape(-1).view(torch.uint8)
    return raw.numpy().tobytes()


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an infer request body; ``header_length`` is Inference-Header-Content-Length."""
    if header_length is None:
        header, blob_start = body, len(body)
    else:
        if not 0 < header_length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {header_length} does not fit a body of {len(body)} bytes")
        header, blob_start = body[:header_length], header_length
    doc = _parse_header(header)
    params = _params(doc.get("parameters"), "request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("request must have a non-empty 'inputs' list")
    # One writable copy of the binary section: torch.frombuffer wants a writable buffer, and
    # the tensors then alias it instead of copying each input again.
    blob = bytearray(memoryview(body)[blob_start:]) if blob_start < len(body) else bytearray()
    pos = 0
    inputs: dict[str, torch.Tensor] = {}
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise BadRequest(f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"inputs[{i}] needs a string 'name'")
        where = f"input {name!r}"
        if name in inputs:
            raise BadRequest(f"{where} appears twice")
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise BadRequest(f"{where}: unsupported datatype {datatype!r} (supported: {', '.join(DATATYPES)})")
        shape = parse_shape(item.get("shape"), where)
        iparams = _params(item.get("parameters"), where)
        size = iparams.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequest(f"{where}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise BadRequest(f"{where}: has both 'data' and binary_data_size")
            if pos + size > len(blob):
                raise BadRequest(f"{where}: binary data runs past the end of the body")
            inputs[name] = binary_tensor(blob, pos, size, datatype, shape, where)
            pos += size
        else:
            if "data" not in item:
                raise BadRequest(f"{where}: needs 'data' or parameters.binary_data_size")
            inputs[name] = _json_tensor(item["data"], datatype, shape, where)
    if pos != len(blob):
        raise BadRequest(f"{len(blob) - pos} bytes of binary data are not claimed by any input")

    outputs: list[RequestedOutput] | None = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for i, item in enumerate(raw_outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise BadRequest(f"outputs[{i}] must be an object with a string 'name'")
            oparams = _params(item.get("parameters"), f"output {item['name']!r}")
            binary = _flag(oparams, "binary_data", f"output {item['name']!r}")
            outputs.append(RequestedOutput(item["name"], binary))
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("'id' must be a string")
    return InferRequest(
        inputs=inputs,
        id=rid,
        parameters=params,
        outputs=outputs,
        binary_output=bool(_flag(params, "binary_data_output", "request")),
    )


def _flag(params: dict[str, Any], key: str, where: str) -> bool | None:
    """A boolean parameter, or None when absent: the string "false" must not read as true."""
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{where}: parameters.{key} must be true or false, got {value!r}")
    return value


def select_outputs(
    outputs: Mapping[str, torch.Tensor], requested: Sequence[RequestedOutput] | None, binary_default: bool
) -> list[tuple[str, torch.Tensor, bool]]:
    """The outputs to send, in order, each with whether it goes in binary."""
    if requested is None:
        chosen = [(name, t, binary_default) for name, t in outputs.items()]
    else:
        chosen = []
        for r in requested:
            if r.name not in outputs:
                raise BadRequest(f"unknown output {r.name!r} (model outputs: {', '.join(outputs)})")
            chosen.append((r.name, outputs[r.name], binary_default if r.binary is None else r.binary))
    return chosen


def _json_data(flat: np.ndarray) -> Any:
    """A flat array as JSON data; non-finite floats as the strings of ``NONFINITE``, not null."""
    if flat.dtype.kind != "f" or np.isfinite(flat).all():
        return flat  # orjson writes a numpy array straight to JSON, far faster than tolist()
    spell = {math.inf: "Infinity", -math.inf: "-Infinity"}
    return [x if math.isfinite(x) else ("NaN" if math.isnan(x) else spell[x]) for x in flat.tolist()]


def encode_response(
    model_name: str,
    outputs: Mapping[str, torch.Tensor],
    *,
    request_id: str | None = None,
    requested: Sequence[RequestedOutput] | None = None,
    binary_default: bool = False,
    model_version: str | None = None,
) -> tuple[bytes, int | None]:
    """Body of an infer response and its JSON header length (None when there is no binary part).

    FP16/BF16 outputs always go in binary: the protocol gives them no JSON form.
    """
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, tensor, binary in select_outputs(outputs, requested, binary_default):
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        datatype = TORCH_TO_V2.get(t.dtype)
        if datatype is None:
            raise BadRequest(f"output {name!r} has dtype {t.dtype}, which V2 cannot carry")
        t = t.contiguous()
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(t.shape)}
        if binary or datatype in BINARY_ONLY:
            data = to_bytes(t)
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = _json_data(t.reshape(-1).numpy())
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def encode_request(
    inputs: Mapping[str, torch.Tensor],
    *,
    binary: bool = True,
    parameters: Mapping[str, Any] | None = None,
    outputs: Sequence[RequestedOutput] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Client side of the codec (load tests, tools): the body and its header length."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, tensor in inputs.items():
        t = tensor.detach().cpu().contiguous()
        datatype = TORCH_TO_V2[t.dtype]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(t.shape)}
        if binary or datatype in BINARY_ONLY:
            data = to_bytes(t)
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = _json_data(t.reshape(-1).numpy())
        entries.append(entry)
    doc: dict[str, Any] = {"inputs": entries}
    if parameters:
        doc["parameters"] = dict(parameters)
    if outputs is not None:
        doc["outputs"] = [
            {"name": o.name, **({"parameters": {"binary_data": o.binary}} if o.binary is not None else {})}
            for o in outputs
        ]
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def decode_response(body: bytes, header_length: int | None = None) -> dict[str, Any]:
    """Client side: parse an infer response into {"id", "model_name", "outputs": {name: tensor}}."""
    header = body if header_length is None else body[:header_length]
    doc: dict[str, Any] = orjson.loads(header)
    blob = bytearray(body[header_length:]) if header_length is not None else bytearray()
    pos = 0
    tensors: dict[str, torch.Tensor] = {}
    for item in doc.get("outputs", []):
        shape = tuple(item["shape"])
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            tensors[item["name"]] = binary_tensor(blob, pos, size, item["datatype"], shape, item["name"]).clone()
            pos += size
        else:
            tensors[item["name"]] = _json_tensor(item["data"], item["datatype"], shape, item["name"])
    doc["outputs"] = tensors
    return doc
