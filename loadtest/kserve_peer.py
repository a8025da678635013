"""The peer: KServe's own Python ModelServer over a model directory, written as KServe users do.

  python loadtest/kserve_peer.py MODEL_DIR NAME PORT

A ``kserve.Model`` predictor that loads the weights the plain way (transformers'
``from_pretrained``) in ``load()`` and runs the forward in ``predict()``, answering V2 with
binary outputs. No cicada code on this path: it is the baseline ``kserve_compare.py`` measures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class Predictor(Model):
    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path
        self.model: torch.nn.Module | None = None
        self.load()

    def load(self) -> bool:
        arch = json.loads((self.path / "config.json").read_text())["architectures"][0]
        self.model = getattr(transformers, arch).from_pretrained(str(self.path)).eval()
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> InferResponse:
        assert self.model is not None
        inputs = {i.name: torch.from_numpy(i.as_numpy()) for i in payload.inputs}
        with torch.inference_mode():
            out: Any = self.model(**inputs)
        outputs = []
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                o = InferOutput(name=key, shape=list(value.shape), datatype="FP32")
                o.set_data_from_numpy(value.numpy(), binary_data=True)
                outputs.append(o)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs,
                             use_binary_outputs=True)


if __name__ == "__main__":
    directory, name, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    ModelServer(http_port=port, enable_grpc=False, enable_latency_logging=False).start([Predictor(name, directory)])
