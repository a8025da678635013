"""What the server says about a model: V2 metadata and Triton's model configuration.

Both transports answer from here (HTTP as JSON, gRPC by filling the same fields into
messages), so metadata and configuration cannot drift apart between them.
"""

from __future__ import annotations

import logging

from cicada_async.service.config import ModelConfig
from cicada_async.service.config import TensorSpec as ConfigSpec
from cicada_async.service.repository import ModelEntry
from protocols.errors import CicadaError
from protocols.serving import TensorSpec

log = logging.getLogger("cicada.server")
PLATFORM = "pytorch"
BACKEND = "pytorch"
Doc = dict[str, object]  # a JSON object


def _spec(s: ConfigSpec) -> TensorSpec:
    return TensorSpec(name=s.name, datatype=s.datatype, shape=list(s.shape))


def io(entry: ModelEntry) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs ({name, datatype, shape}): the config's, else the model's own.

    The model's own are known once it has been loaded (empty lists before the first load).
    """
    cfg = entry.config
    inputs = [_spec(s) for s in cfg.inputs] if cfg.inputs else None
    outputs = [_spec(s) for s in cfg.outputs] if cfg.outputs else None
    if inputs is None or outputs is None:
        try:
            d_in, d_out = entry.instance.io_spec()
        except CicadaError as e:
            log.warning("io_spec failed for %s: %s", cfg.name, e)
            d_in, d_out = [], []
        inputs = inputs if inputs is not None else list(d_in)
        outputs = outputs if outputs is not None else list(d_out)
    return inputs, outputs


def metadata(entry: ModelEntry) -> Doc:
    inputs, outputs = io(entry)
    return {"name": entry.name, "versions": ["1"], "platform": PLATFORM, "inputs": inputs, "outputs": outputs}


def _tensor(spec: TensorSpec, batched: bool) -> Doc:
    # With max_batch_size > 0 Triton's dims leave out the batch dimension; with 0 they are the
    # whole shape.
    dims = list(spec["shape"])[1:] if batched else list(spec["shape"])
    return {"name": spec["name"], "data_type": "TYPE_" + spec["datatype"], "dims": dims}


def triton_config(entry: ModelEntry) -> Doc:
    """Triton's ModelConfig in its JSON form (what tritonclient's ``get_model_config`` returns).

    ``TYPE_`` + the V2 datatype is Triton's DataType name for every datatype we serve. A model
    without batching has max_batch_size 0 and no dynamic_batching; one with it (the model's
    ``max_batch_size`` > 0, see batcher.py) reports its settings there.
    """
    cfg: ModelConfig = entry.config
    max_batch = cfg.max_batch_size
    inputs, outputs = io(entry)
    out: Doc = {
        "name": entry.name, "platform": PLATFORM, "backend": BACKEND, "max_batch_size": max_batch,
        "input": [_tensor(s, max_batch > 0) for s in inputs],
        "output": [_tensor(s, max_batch > 0) for s in outputs],
    }
    if max_batch > 0:
        out["dynamic_batching"] = {
            "preferred_batch_size": list(cfg.preferred_batch_sizes),
            "max_queue_delay_microseconds": cfg.max_queue_delay_us,
        }
    return out
