"""The four ways to answer one cold inference, side by side: the pipeline and three baselines.

- ``eager``: construct with default init, ``safetensors.torch.load_file``, ``load_state_dict``.
- ``meta-mmap``: the strong stock baseline: parameters on meta, mmapped safetensors,
  ``load_state_dict(assign=True)``, ties restored.
- ``hf``: transformers ``from_pretrained`` (what most users do today).
- ``cicada``: the pipelined cold start.
Each returns the named outputs and a dict of stage timings in seconds, with ``outputs_at``:
the ``time.perf_counter()`` at which the first forward's outputs were on the host, where every
strategy's clock stops (teardown is after it, for all of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cicada_async.engine.forward import output_dict
from cicada_async.engine.modeldir import ModelSpec, read_model_spec
from cicada_async.engine.skeleton import cast_for_serving
from protocols.errors import ConfigError, WeightMismatch

STRATEGIES = ("cicada", "eager", "meta-mmap", "hf")
Result = tuple[dict[str, torch.Tensor], dict[str, float]]


def local_spec(model_dir: str | Path) -> ModelSpec:
    from backends.local import LocalBackend

    async def read() -> ModelSpec:
        backend = LocalBackend(model_dir)
        try:
            return await read_model_spec(backend)
        finally:
            await backend.aclose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(read())
    # Called from inside a running loop (tests, the server): run on a helper thread.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result()


def _state_dict(model_dir: Path, spec: ModelSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in spec.weight_files:
        sd.update(load_file(str(model_dir / f)))
    rename = spec.checkpoint_renamer(model)
    return {rename(k): v for k, v in sd.items()} if rename else sd


def _check(model: nn.Module, missing: list[str], unexpected: list[str]) -> None:
    tied = _tied_names(model)
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise WeightMismatch(f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def _tied_names(model: nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update((name, seen[id(p)]))
        seen[id(p)] = name
    return tied


def eager(model_dir: Path, spec: ModelSpec, inputs: dict[str, torch.Tensor], dtype: torch.dtype | None,
          device: str = "cpu") -> Result:
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    model = spec.build()
    t["construct_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    sd = _state_dict(model_dir, spec, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    _check(model, missing, unexpected)
    if dtype is not None:
        cast_for_serving(model, dtype)  # as from_pretrained(dtype=...) does
    model.to(device)
    t["load_s"] = time.perf_counter() - t1
    return _forward(model, inputs, t, device)


def meta_mmap(model_dir: Path, spec: ModelSpec, inputs: dict[str, torch.Tensor], dtype: torch.dtype | None,
              device: str = "cpu", load: Callable[[], dict[str, torch.Tensor]] | None = None) -> Result:
    """Parameters on meta, then the checkpoint's tensors assigned; ``load`` (the remote peers:
    tensorizer, Run:ai) supplies the tensors in the checkpoint's names instead of mmapped files."""
    from cicada_async.engine.skeleton import skeleton_mode

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    with skeleton_mode():
        model = spec.build()
    ties = [
        [(m, n) for m, n in group]
        for group in _tie_groups(model)
    ]
    t["construct_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if load is None:
        sd = _state_dict(model_dir, spec, model)
    else:
        rename = spec.checkpoint_renamer(model)
        sd = {rename(k): v for k, v in load().items()} if rename else load()
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    for group in ties:  # assign=True replaces parameters, which unties them
        (m0, n0), *rest = group
        p = m0._parameters[n0]
        if p is not None and p.is_meta:
            for m, n in rest:
                if not m._parameters[n].is_meta:  # type: ignore[union-attr]
                    p = m._parameters[n]
        for m, n in group:
            m._parameters[n] = p
    _check(model, [k for k in missing], unexpected)
    if dtype is not None:
        cast_for_serving(model, dtype)  # as from_pretrained(dtype=...) does
    model.to(device)
    t["load_s"] = time.perf_counter() - t1
    return _forward(model, inputs, t, device)


def _tie_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for n, p in mod._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((mod, n))
    return [g for g in groups.values() if len(g) > 1]


def hf(model_dir: Path, spec: ModelSpec, inputs: dict[str, torch.Tensor], dtype: torch.dtype | None,
       device: str = "cpu") -> Result:
    if spec.kind != "transformers":
        raise ConfigError("strategy 'hf' needs a transformers model directory (config.json)")
    import transformers

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    cls = getattr(transformers, spec.architecture)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    # What users do today: from_pretrained, then .to(device).
    model = cls.from_pretrained(str(model_dir), **kwargs).eval().to(device)
    t["load_s"] = time.perf_counter() - t0
    return _forward(model, inputs, t, device)


def cicada(model_dir: Path, spec: ModelSpec, inputs: dict[str, torch.Tensor], dtype: torch.dtype | None,
           device: str = "cpu", timeline_out: list[Any] | None = None, **engine_kwargs: Any) -> Result:
    from cicada_async.engine.runtime import Engine, ModelOptions

    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(dtype) if dtype else None

    async def go(settings: dict[str, Any]) -> Result:
        t0 = time.perf_counter()  # the engine's start (its thread) counts; its teardown does not
        async with Engine(**settings) as engine:
            inst = engine.instance("model", str(model_dir), ModelOptions(dtype=dtype_name, device=device),
                                   describe=False)
            out = await inst.infer(inputs)
            done = time.perf_counter()  # outputs on the host; the engine's shutdown comes after
            total = done - t0
            tl = inst.last_timeline
            assert tl is not None
            if timeline_out is not None:
                timeline_out.append(tl)
            summary = tl.summary()
            t = {f"{k}_s" if not k.endswith("_s") else k: v for k, v in summary["stages"].items()}
            t["total_s"] = total
            t["outputs_at"] = done
            return out, t

    with as_served(engine_kwargs) as settings:
        return asyncio.run(go(settings))


@contextlib.contextmanager
def as_served(engine_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Torch threads and Engine settings as ``cicada serve`` has them by default, for one
    cicada run: ``threads_while_fetching`` torch threads, and a forward that widens to every
    core once nothing fetches. Yields the Engine's keyword arguments; threads restored after."""
    from cicada_async.engine.procfs import threads_while_fetching

    before = torch.get_num_threads()
    torch.set_num_threads(threads_while_fetching())
    try:
        yield {"every_core_when_idle": True, **engine_kwargs}
    finally:
        torch.set_num_threads(before)


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor], t: dict[str, float], device: str = "cpu") -> Result:
    t2 = time.perf_counter()
    with torch.inference_mode():
        out = output_dict(model(**{k: v.to(device) for k, v in inputs.items()}))
        out = {k: v.cpu() for k, v in out.items()}  # waits for the device, like a response would
    # The common stop of every strategy's clock: freeing the model comes after, outside it.
    t["outputs_at"] = time.perf_counter()
    t["forward_s"] = t["outputs_at"] - t2
    return out, t


RUNNERS: dict[str, Callable[..., Result]] = {
    "cicada": cicada, "eager": eager, "meta-mmap": meta_mmap, "hf": hf,
}


def example_inputs(spec: ModelSpec, *, batch: int = 1, seq: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random inputs for the model's forward (token ids below the vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    vocab = int(spec.config.get("vocab_size", spec.config.get("kwargs", {}).get("vocab", 256)))
    for name, t in spec.dummy_inputs(batch=batch, seq=seq).items():
        if t.dtype.is_floating_point:
            out[name] = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        else:
            out[name] = torch.randint(0, max(2, min(vocab, 1000)), t.shape, generator=gen, dtype=t.dtype)
    return out
