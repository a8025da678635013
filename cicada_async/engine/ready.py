"""Skeletons kept ready: a model's meta skeleton built ahead of its first request, and again
after each load, so a cold start skips the build.

A load materializes parameters into its skeleton in place, so the skeleton handed to a load is
never used again. One instance keeps a pristine skeleton (never handed out) and a spare copy
of it: a load takes the spare at no cost, and a new spare is copied from the pristine after
the load, at low priority on the executor, one submodule at a time with the turn offered to
queued work between pieces (a request waits for one module's copy, not the whole copy).
Measured on 2 cores (bench-results/skeleton-memory.json): a warm rebuild of gpt2's skeleton
takes 35 ms and a ``copy.deepcopy`` of the meta skeleton 24 ms (gpt2-medium 54 ms), so copying
refills faster than building, and handing over a ready spare keeps both off the load's
critical path. A spare is only valid for the spec it was built from: the key is the model's
kind, class or factory, config and serving dtype (all the build reads); a load whose spec
has another key builds its own and the kept ones are rebuilt from the new spec after it.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from protocols.serving import Priority

from cicada_async.engine.executor import Executor, ExecutorDead, yield_point
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
        """The spare's copy offers the running executor job's turn between its pieces (the
        server's prebuild, at Priority.BACKGROUND, copied gpt2-medium's 54 ms in one piece); a
        new build of the pristine is one piece."""
        key = skeleton_key(spec, dtype)
        self._last = (spec, dtype)
        if self._pristine is None or self._key != key:
            self._pristine, self._spare, self._key = build_skeleton(spec, dtype), None, key
            self.builds += 1
        if self._spare is None:
            spare = self._copy()
            if self._spare is None:  # another refill may have finished while this one yielded
                self._spare = spare

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

    def refill(self, executor: Executor) -> concurrent.futures.Future[None] | None:
        """After a load (loop thread): queue a new spare, at low priority, if one is wanted.

        Returns the queued job (None when nothing was queued).
        """
        if not self.wanted or self._last is None or self._spare is not None:
            return None
        spec, dtype = self._last
        try:
            # Priority.BACKGROUND: below every request and the warm imports, so a refill starts
            # only when the executor has nothing else queued; and the copy yields between
            # submodules, so a request queued once it started waits for one piece, not for the
            # whole 24-71 ms copy (review-3 C-17).
            fut = executor.submit(self.build, spec, dtype, priority=Priority.BACKGROUND)
        except ExecutorDead:
            return None
        fut.add_done_callback(self._report)
        return fut

    def _copy(self) -> nn.Module | None:
        """A copy of the pristine in pieces, offering the executor job's turn between them (a
        load's take, the prebuild and a refill alike; nothing off an executor's worker)."""
        source = self._pristine
        if source is None:
            return None
        try:
            module = _deepcopy_in_pieces(source)
        except Exception as e:  # noqa: BLE001 - a model that cannot be copied is built per load
            log.info("cannot copy the skeleton of %s (%s: %s); building per load", self.name, type(e).__name__, e)
            self._pristine = self._key = None
            self.wanted = False
            return None
        if self._pristine is not source:
            return None  # a load of another spec replaced the pristine while the copy yielded
        self.copies += 1
        return module

    def _report(self, fut: concurrent.futures.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("building the skeleton of %s ahead failed (%s); it is built at load time",
                        self.name, fut.exception())


def _deepcopy_in_pieces(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, one submodule at a time with the executor's ``yield_point()``
    between (a no-op off a worker).

    Children are copied before their parents into one memo, so each parent's copy finds its
    children (and any tensor tied across modules) already copied: the result is the object
    graph a single deepcopy makes, and each piece is one module's own state.
    """
    memo: dict[int, Any] = {}
    for sub in _children_first(module):
        if sub is not module:
            copy.deepcopy(sub, memo)
            yield_point()
    copied: nn.Module = copy.deepcopy(module, memo)
    return copied


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule once, in registration order, each after all of its children."""
    seen: set[int] = set()
    stack: list[tuple[nn.Module, Iterator[nn.Module]]] = [(module, module.children())]
    seen.add(id(module))
    while stack:
        parent, children = stack[-1]
        for child in children:
            if id(child) not in seen:
                seen.add(id(child))
                stack.append((child, child.children()))
                break
        else:
            stack.pop()
            yield parent
