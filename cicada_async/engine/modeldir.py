"""Model directories: what architecture to build, which weight files, and example inputs.

Two forms are accepted. A Hugging Face layout (``config.json`` whose ``architectures`` names a
transformers class) or a ``cicada.json`` naming an importable factory for plain PyTorch models.
Weights are ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import orjson
import torch
from torch import nn

from protocols.errors import CheckpointError, CicadaError, ConfigError, ObjectNotFound
from protocols.storage import StorageBackend

if TYPE_CHECKING:
    from transformers import PreTrainedModel  # what build() makes for kind "transformers"

SMALL_FILE_LIMIT = 16 << 20  # config and index files; anything larger is not a config
VISION_TYPES = {"vit", "resnet", "convnext", "deit", "swin", "beit", "dinov2", "mobilenet_v2"}
# Text configs name their context length in one of these.
_POSITIONS = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass
class ModelSpec:
    """Everything needed to build a model's skeleton and find its weights."""

    kind: str  # "transformers" or "factory"
    architecture: str  # transformers class name, or "package.module:callable"
    config: dict[str, Any]
    weight_files: list[str]
    example_inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None  # cicada.manifest.json: per-file size and sha256

    def build(self) -> nn.Module:
        """Construct the model; under ``skeleton.skeleton_mode`` parameters land on meta."""
        if self.kind == "factory":
            return _import_factory(self.architecture)(**self.config.get("kwargs", {})).eval()
        import transformers

        from cicada_async.engine import hfimport

        cls = hfimport.find(self.architecture)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ConfigError(f"config.json names {self.architecture!r}, not a transformers model class")
        cfg_dict = dict(self.config)
        model_type = cfg_dict.pop("model_type", None)
        if model_type is None:
            raise ConfigError("config.json has no model_type")
        config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
        model: nn.Module = cls._from_config(config)
        return model.eval()

    def checkpoint_renamer(self, model: nn.Module) -> Callable[[str], str] | None:
        """transformers' own renames of legacy checkpoint keys, for this model class."""
        if self.kind != "transformers":
            return None
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming
        except ImportError:  # transformers 4.x keeps checkpoint names as they are
            return None
        rules = [
            (re.compile(src), dst)
            for r in (get_model_conversion_mapping(cast("PreTrainedModel", model)) or [])
            if isinstance(r, WeightRenaming)
            for src, dst in zip(r.source_patterns, r.target_patterns)
        ]
        if not rules:
            return None

        def rename(name: str) -> str:
            for pattern, target in rules:
                name = pattern.sub(target, name)
            return name

        return rename

    def dummy_inputs(self, batch: int = 1, seq: int = 8, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Inputs of the right names, dtypes and shapes (zeros) for dry runs."""
        out: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in self.example_inputs.items():
            shape = tuple(batch if i == 0 and d < 0 else (seq if d < 0 else d) for i, d in enumerate(shape))
            out[name] = torch.zeros(shape, dtype=dtype, device=device)
        return out


# Model directories made before the package layout name their factories by the old module.
_MOVED_MODULES = {"cicada_async.plain_models": "cicada_async.models.plain"}


def _import_factory(target: str) -> Callable[..., nn.Module]:
    module_name, _, attr = target.partition(":")
    module_name = _MOVED_MODULES.get(module_name, module_name)
    if not module_name or not attr:
        raise ConfigError(f"cicada.json factory {target!r} must look like 'package.module:callable'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import factory {target!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"factory {target!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}")
    return dt


def example_inputs_for(kind: str, config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Input names, shapes (-1 = variable) and dtypes the model's forward takes."""
    if kind == "factory":
        declared = config.get("inputs")
        if not isinstance(declared, Mapping) or not declared:
            raise ConfigError("cicada.json needs 'inputs': {name: {shape: [...], dtype: ...}}")
        return {
            n: (tuple(int(d) for d in spec["shape"]), _dtype(spec.get("dtype", "float32")))
            for n, spec in declared.items()
        }
    model_type = config.get("model_type", "")
    if model_type in VISION_TYPES:
        channels = int(config.get("num_channels", 3))
        size = int(config.get("image_size", 224))
        return {"pixel_values": ((-1, channels, size, size), torch.float32)}
    return {"input_ids": ((-1, -1), torch.int64)}


async def read_small(backend: StorageBackend, key: str, *, limit: int = SMALL_FILE_LIMIT,
                     too_large: Callable[[str], CicadaError] | None = None) -> bytes | None:
    """A small object whole (config, index, manifest, plan file), or None when it is absent."""
    try:
        info = await backend.stat(key)
    except ObjectNotFound:
        return None
    if info.size > limit:
        msg = f"{key} is {info.size} bytes"
        raise too_large(msg) if too_large is not None else ConfigError(f"{msg}; that is not a config file")
    buf = bytearray(info.size)
    if info.size:
        await backend.read_into(key, 0, memoryview(buf), version=info.version)
    return bytes(buf)


def _json(raw: bytes, key: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"{key} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{key} must hold a JSON object")
    return obj


async def read_model_spec(backend: StorageBackend) -> ModelSpec:
    """Read the small files of a model directory (concurrently: each is a round trip remotely)."""
    cicada_raw, config_raw, index_raw, single, manifest_raw = await asyncio.gather(
        read_small(backend, "cicada.json"),
        read_small(backend, "config.json"),
        read_small(backend, "model.safetensors.index.json"),
        _exists(backend, "model.safetensors"),
        read_small(backend, "cicada.manifest.json"),
    )
    if cicada_raw is not None:
        cfg = _json(cicada_raw, "cicada.json")
        factory = cfg.get("factory")
        if not isinstance(factory, str):
            raise ConfigError("cicada.json needs 'factory': 'package.module:callable'")
        kind, arch = "factory", factory
    elif config_raw is not None:
        cfg = _json(config_raw, "config.json")
        archs = cfg.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ConfigError("config.json has no 'architectures' naming a transformers class")
        kind, arch = "transformers", archs[0]
    else:
        raise ConfigError("model directory has neither config.json nor cicada.json")

    if index_raw is not None:
        index = _json(index_raw, "model.safetensors.index.json")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("model.safetensors.index.json has no weight_map")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not isinstance(f, str) or not f.endswith(".safetensors"):
                raise CheckpointError(f"index names {f!r}, which is not a .safetensors file")
    elif single:
        files = ["model.safetensors"]
    else:
        raise CheckpointError("no model.safetensors or model.safetensors.index.json (only safetensors are loaded)")
    manifest = None
    if manifest_raw is not None:
        from cicada_async.engine.manifest import load_manifest

        manifest = load_manifest(manifest_raw)
        missing = [f for f in files if f not in manifest["files"]]
        if missing:
            raise CheckpointError(f"cicada.manifest.json does not list {', '.join(missing)}")
    return ModelSpec(kind, arch, cfg, files, example_inputs_for(kind, cfg), manifest)


async def _exists(backend: StorageBackend, key: str) -> bool:
    try:
        await backend.stat(key)
    except ObjectNotFound:
        return False
    return True


def prepare_imports(spec: ModelSpec) -> None:
    """Import what building the model needs, so no strategy's timing pays for imports."""
    if spec.kind == "transformers":
        import transformers

        getattr(transformers, spec.architecture)
        import_conversion_mapping()


def import_conversion_mapping() -> None:
    # transformers 5 renames legacy checkpoint keys through these modules (from_pretrained and
    # our loader alike); importing them costs ~40 ms the first time.
    # The first lookup also compiles ~1000 regular expressions for every architecture (~150 ms).
    try:
        import transformers.core_model_loading  # noqa: F401
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return
    get_checkpoint_conversion_mapping("llama")


def import_model_libraries() -> None:
    """transformers and its rename rules, for an idle executor thread to import ahead."""
    try:
        from cicada_async.engine import hfimport

        hfimport.warm()  # under the lock other threads resolve transformers names with
        # Not import_conversion_mapping(): its rules are built only for checkpoints whose
        # names need them (skeleton.index_skeleton), and in a scale-from-zero this import is
        # on the first request's path.
    except ImportError:  # plain-PyTorch models need no transformers
        pass
