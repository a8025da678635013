"""Skeletons kept ready: a model's meta skeleton built ahead of its first request, and again
after each load, so a cold start skips the build.

A load materializes parameters into its skeleton in place, so the skeleton handed to a load is
never used again. One instance keeps a pristine skeleton (never handed out) and a spare copy
of it: a load takes the spare at no cost, and a new spare is copied from the pristine after
the load, at low priority on the executor. Measured on 2 cores (docs/service.md): a warm
rebuild of gpt2's skeleton takes ~36 ms and a ``copy.deepcopy`` of the meta skeleton ~21 ms,
so copying refills faster than building, and handing over a ready spare keeps both off the
critical path. A spare is only valid for the spec it was built from: the key is the model's
kind, class or factory, config and serving dtype (all the build reads); a load whose spec
has another key builds its own and the kept ones are rebuilt from the new spec after it.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging

import torch
from torch import nn

from protocols.serving import Priority

from cicada_async.engine.executor import Executor, ExecutorDead
from cicada_async.engine.modeldir import ModelSpec
from cicada_async.engine.plancache import digest, spec_material
from cicada_async.engine.skeleton import build_skeleton

log = logging.getLogger(__name__)

def skeleton_key(spec: ModelSpec, dtype: torch.dtype | None) -> str:
    return digest({"model": spec_material(spec), "dtype": str(dtype)})


class ReadySkeleton:
    """The kept skeletons of one model; every method but ``refill`` runs on the executor."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wanted = False  # set by a prebuild: from then on one is kept ready
        self.builds = 0
        self.copies = 0
        self._key: str | None = None
        self._pristine: nn.Module | None = None  # never handed out: the source of copies
        self._spare: nn.Module | None = None  # the next load's skeleton
        self._last: tuple[ModelSpec, torch.dtype | None] | None = None

    @property
    def ready(self) -> bool:
        return self._spare is not None

    def build(self, spec: ModelSpec, dtype: torch.dtype | None) -> None:
        key = skeleton_key(spec, dtype)
        self._last = (spec, dtype)
        if self._pristine is None or self._key != key:
            self._pristine, self._spare, self._key = build_skeleton(spec, dtype), None, key
            self.builds += 1
        if self._spare is None:
            self._spare = self._copy()

    def take(self, spec: ModelSpec, dtype: torch.dtype | None) -> nn.Module | None:
        """The spare for a load of ``spec``, or None (the load builds its own)."""
        self._last = (spec, dtype)
        if self._key != skeleton_key(spec, dtype):
            if self._key is not None:
                log.info("the model %s changed since its skeleton was built; building anew", self.name)
            self._pristine = self._spare = self._key = None
            return None
        spare, self._spare = self._spare, None
        return spare if spare is not None else self._copy()  # taken twice before a refill

    def refill(self, executor: Executor) -> None:
        """After a load (loop thread): queue a new spare, at low priority, if one is wanted."""
        if not self.wanted or self._last is None or self._spare is not None:
            return
        try:
            # Priority.BACKGROUND: below every request and the warm imports, so a refill runs
            # only when the executor has nothing else queued.
            fut = executor.submit(self.build, *self._last, priority=Priority.BACKGROUND)
        except ExecutorDead:
            return
        fut.add_done_callback(self._report)

    def _copy(self) -> nn.Module | None:
        if self._pristine is None:
            return None
        try:
            module = copy.deepcopy(self._pristine)
        except Exception as e:  # noqa: BLE001 - a model that cannot be copied is built per load
            log.info("cannot copy the skeleton of %s (%s: %s); building per load", self.name, type(e).__name__, e)
            self._pristine = self._key = None
            self.wanted = False
            return None
        self.copies += 1
        return module

    def _report(self, fut: concurrent.futures.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("building the skeleton of %s ahead failed (%s); it is built at load time",
                        self.name, fut.exception())
