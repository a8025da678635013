"""Model directories made on the fly (random weights, real architectures), once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cicada_async.zoo import make_model

TINY = ["tiny-gpt2", "tiny-bert", "tiny-resnet", "tiny-vit", "tiny-llama", "tiny-llama-untied",
        "tiny-convnet", "tiny-mlp"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {name: make_model(name, root / name, seed=1) for name in TINY}
    dirs["tiny-gpt2-sharded"] = make_model("tiny-gpt2", root / "tiny-gpt2-sharded", seed=2, max_shard_bytes=200_000)
    return dirs
