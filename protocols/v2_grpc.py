"""The V2 gRPC codec: ``ModelInferRequest`` to tensors and outputs to ``ModelInferResponse``.

Pure functions over the messages of ``grpc_v2.proto``; the request comes out as the same
``v2.InferRequest`` the HTTP codec makes, so both transports share everything after decoding.
Importing this module registers the protobuf package ``inference`` in protobuf's default
pool, as tritonclient.grpc and kserve do (two of them cannot share a process): only the gRPC
server imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from protocols import grpc_v2_pb2 as pb
from protocols import v2
from protocols.errors import BadRequest

# Datatype -> the InferTensorContents field that carries it, and the numpy type it arrives as.
# FP16 and BF16 have no typed field: raw_input_contents only, as in Triton.
_CONTENTS: dict[str, tuple[str, Any]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}
_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
           "fp32_contents", "fp64_contents", "bytes_contents")


def parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """An ``InferParameter`` map as plain values (priority arrives as uint64 from tritonclient)."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def _contents_tensor(t: Any, datatype: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    spec = _CONTENTS.get(datatype)
    if spec is None:
        raise BadRequest(f"{where}: {datatype} has no typed contents; send it in raw_input_contents")
    field, src = spec
    stray = [f for f in _FIELDS if f != field and len(getattr(t.contents, f))]
    if stray:
        raise BadRequest(f"{where}: {datatype} data belongs in contents.{field}, got {', '.join(stray)}")
    values = getattr(t.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(f"{where}: {len(values)} elements in contents but shape {list(shape)} needs {count}")
    arr = np.array(values, dtype=src)
    target = v2.DATATYPES[datatype]
    if src in (np.int32, np.uint32) and datatype not in ("INT32", "UINT32"):
        info = torch.iinfo(target)  # 8- and 16-bit types travel widened: check before narrowing
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BadRequest(f"{where}: contents out of range for {datatype}")
    return torch.from_numpy(arr).to(target).reshape(shape)


def decode_infer(msg: Any) -> v2.InferRequest:
    """A ``ModelInferRequest`` as a ``v2.InferRequest``; ``BadRequest`` for anything malformed."""
    raw = msg.raw_input_contents
    if not msg.inputs:
        raise BadRequest("request must have at least one input")
    if raw and len(raw) != len(msg.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(msg.inputs)} inputs (one each, or none)")
    inputs: dict[str, torch.Tensor] = {}
    for i, t in enumerate(msg.inputs):
        if not t.name:
            raise BadRequest(f"inputs[{i}] needs a name")
        where = f"input {t.name!r}"
        if t.name in inputs:
            raise BadRequest(f"{where} appears twice")
        if t.datatype not in v2.DATATYPES:
            raise BadRequest(f"{where}: unsupported datatype {t.datatype!r} (supported: {', '.join(v2.DATATYPES)})")
        shape = v2.parse_shape(list(t.shape), where)
        if raw:
            if t.HasField("contents"):
                raise BadRequest(f"{where}: has both contents and raw_input_contents")
            data = raw[i]
            inputs[t.name] = v2.binary_tensor(bytearray(data), 0, len(data), t.datatype, shape, where)
        else:
            inputs[t.name] = _contents_tensor(t, t.datatype, shape, where)
    outputs = [v2.RequestedOutput(o.name) for o in msg.outputs] if msg.outputs else None
    if outputs is not None and any(not o.name for o in outputs):
        raise BadRequest("every requested output needs a name")
    return v2.InferRequest(inputs=inputs, id=msg.id or None, parameters=parameters(msg.parameters),
                           outputs=outputs)


def encode_infer(model_name: str, outputs: Mapping[str, torch.Tensor], *, request_id: str | None = None,
                 requested: Sequence[v2.RequestedOutput] | None = None) -> Any:
    """A ``ModelInferResponse`` with every output in ``raw_output_contents`` (as Triton answers)."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version="1", id=request_id or "")
    for name, tensor, _ in v2.select_outputs(outputs, requested, True):
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        datatype = v2.TORCH_TO_V2.get(t.dtype)
        if datatype is None:
            raise BadRequest(f"output {name!r} has dtype {t.dtype}, which V2 cannot carry")
        t = t.contiguous()
        resp.outputs.add(name=name, datatype=datatype, shape=list(t.shape))
        resp.raw_output_contents.append(v2.to_bytes(t))
    return resp
