"""What every transport does with an infer request: admit, check, submit, account.

HTTP (``infer.py``) and gRPC (``grpc_server.py``) each read and decode their own wire format
into a ``v2.InferRequest`` and encode the outputs back; everything between is here, so that
both answer the same request the same way, under the same scheduler, limits and statistics.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from aiohttp import web

from cicada_async.service.appkeys import CONFIG_KEY, ENGINE_KEY, METRICS_KEY, REPO_KEY, SCHED_KEY, STATE_KEY, STATS_KEY
from cicada_async.service.config import ModelConfig
from cicada_async.service.repository import ModelEntry
from cicada_async.service.stats import Outcome
from protocols import v2
from protocols.errors import BadRequest, CicadaError, InferenceError, Overloaded, ShuttingDown


def engine_healthy(app: web.Application) -> bool:
    """False from the moment the executor thread is found dead until it has been replaced."""
    if app[STATE_KEY].get("restarting"):
        return False
    engine = app.get(ENGINE_KEY)
    return bool(getattr(engine, "healthy", True)) if engine is not None else True


def admit(app: web.Application, name: str) -> ModelEntry:
    """The model, unless the server cannot take work now (draining, executor restarting)."""
    entry = app[REPO_KEY].get(name)
    if app[STATE_KEY].get("draining"):
        raise ShuttingDown("server is shutting down")
    if not engine_healthy(app):
        raise Overloaded("the engine is restarting; retry later", app[CONFIG_KEY].server.retry_after_s)
    return entry


def check_queue(app: web.Application, entry: ModelEntry) -> None:
    """Refuse at once when no newcomer could get into the queue, whatever its priority."""
    if app[SCHED_KEY].hopeless(entry):
        app[METRICS_KEY].shed.inc(model=entry.name, reason="queue_full")
        raise Overloaded(f"queue for model {entry.name!r} is full; retry later", app[CONFIG_KEY].server.retry_after_s)


def check_inputs(cfg: ModelConfig, instance: Any, inputs: dict[str, Any]) -> None:
    """Refuse inputs that contradict the published metadata before they reach the engine.

    A bad first request would otherwise fail the cold start that every queued request shares.
    Names are checked only against metadata from the config (the engine's derived metadata
    lists the example inputs, not every optional keyword a forward accepts).
    """
    rows = {t.shape[0] for t in inputs.values() if t.dim()}
    if cfg.max_batch_size and rows and max(rows) > cfg.max_batch_size:
        # As Triton: a batching model's first dimension is the batch, bounded by max_batch_size.
        raise BadRequest(f"batch size {max(rows)} exceeds the model's max_batch_size ({cfg.max_batch_size})")
    if cfg.inputs:
        specs = {s.name: s.as_dict() for s in cfg.inputs}
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise BadRequest(f"unknown input(s) {', '.join(map(repr, unknown))} (model inputs: {', '.join(specs)})")
    else:
        try:
            specs = {s["name"]: s for s in instance.io_spec()[0]}
        except CicadaError:
            return
    for name, t in inputs.items():
        spec = specs.get(name)
        if spec is None:
            continue
        datatype = v2.TORCH_TO_V2.get(t.dtype)
        if datatype != spec["datatype"]:
            raise BadRequest(f"input {name!r} must be {spec['datatype']}, got {datatype}")
        shape = list(spec["shape"])
        # Rank only: derived metadata may pin example sizes that the model does not require.
        if len(shape) != t.dim():
            raise BadRequest(f"input {name!r} has shape {list(t.shape)}, model expects {shape}")


def check_outputs(cfg: ModelConfig, requested: list[v2.RequestedOutput] | None) -> None:
    """Refuse an unknown output name before computing, when the config lists the outputs.

    Without configured outputs, ``v2.select_outputs`` names it after the forward (the
    engine knows a model's outputs only once it ran).
    """
    if cfg.outputs and requested:
        known = [s.name for s in cfg.outputs]
        unknown = sorted({r.name for r in requested} - set(known))
        if unknown:
            raise BadRequest(f"unknown output(s) {', '.join(map(repr, unknown))} (model outputs: {', '.join(known)})")


_KWARG = re.compile(r"unexpected keyword argument '([^']+)'")


def unknown_input(e: InferenceError, inputs: dict[str, Any]) -> BadRequest | None:
    """A forward that refused a keyword was sent an input it does not take: the caller's 400.

    Derived metadata cannot list every optional keyword of a transformers forward, so the
    forward's own signature check is the authority; its TypeError (a 500 naming a class)
    becomes a 400 naming the input.
    """
    m = _KWARG.search(str(e)) if isinstance(e.__cause__, TypeError) else None
    if m is None or m.group(1) not in inputs:
        return None
    return BadRequest(f"unknown input {m.group(1)!r}: the model's forward does not take it")


async def run(app: web.Application, entry: ModelEntry, req: v2.InferRequest, outcome: Outcome, *,
              deadline_s: float | None = None) -> dict[str, torch.Tensor]:
    """Check a decoded request against the model, queue it, and wait for its outputs.

    ``deadline_s`` is the transport's own deadline (a gRPC deadline), combined with the
    request's ``timeout`` parameter: the earlier one wins.
    """
    check_inputs(entry.config, entry.instance, req.inputs)
    check_outputs(entry.config, req.outputs)
    timeout_s = req.timeout_s
    if deadline_s is not None:
        timeout_s = deadline_s if timeout_s is None else min(timeout_s, deadline_s)
    try:
        outputs, stats = await app[SCHED_KEY].submit(entry, req.inputs, priority=req.priority, timeout_s=timeout_s)
    except InferenceError as e:
        raise unknown_input(e, req.inputs) or e
    outcome.queue_ns = int(stats.queue_s * 1e9)
    outcome.compute_ns = int(stats.compute_s * 1e9)
    return outputs


@contextmanager
def accounted(app: web.Application, name: str) -> Iterator[Outcome]:
    """Metrics and statistics of one infer request; success when the block ends normally."""
    t0 = time.monotonic_ns()
    outcome = Outcome()
    ok = False
    try:
        yield outcome
        ok = True
    finally:
        total_ns = time.monotonic_ns() - t0
        m = app[METRICS_KEY]
        if ok:
            m.count.inc(model=name, version="1")
            m.queue_us.inc((outcome.queue_ns or 0) // 1000, model=name, version="1")
            m.compute_us.inc(outcome.compute_ns // 1000, model=name, version="1")
        (m.success if ok else m.failure).inc(model=name, version="1")
        m.request_us.inc(total_ns // 1000, model=name, version="1")
        app[STATS_KEY].record(name, ok, total_ns, outcome)
