"""A skeleton refill (a deepcopy of 24-71 ms) hands the turn to a request queued meanwhile
(review-3 C-17), and still makes a faithful copy.

The refill runs at Priority.BACKGROUND; a request queued while it copies used to wait for the
whole copy. The oracle is the order in which the copy reaches two marked submodules and the
request runs (a log written by the marked modules' own ``__deepcopy__`` and by the request),
not the executor's bookkeeping.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from cicada_async.engine.executor import Executor
from cicada_async.engine.modeldir import ModelSpec
from cicada_async.engine.ready import ReadySkeleton
from protocols.serving import Priority

pytestmark = pytest.mark.timeout(60)

LOG: list[str] = []
ON_FIRST_MARK: list[Any] = []  # armed by the test: called when the first marked module is copied


class Marked(nn.Module):
    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.proj = nn.Linear(4, 4)

    def __deepcopy__(self, memo: dict[int, Any]) -> Marked:
        LOG.append(self.tag)
        if ON_FIRST_MARK:
            ON_FIRST_MARK.pop()()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.a = Marked("a")
        self.mid = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
        self.b = Marked("b")
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: the copy must keep one tensor


def make_net() -> nn.Module:
    return Net()


SPEC = ModelSpec("factory", f"{__name__}:make_net", {}, [])


def test_refill_yields_to_a_request_queued_while_it_copies() -> None:
    ex = Executor()
    ex.start()
    try:
        ready = ReadySkeleton("m")
        ready.wanted = True
        ex.submit(ready.build, SPEC, None).result(timeout=10)
        assert ex.submit(ready.take, SPEC, None).result(timeout=10) is not None
        assert not ready.ready
        LOG.clear()
        requests: list[Any] = []

        def request() -> None:
            LOG.append("request")

        # From inside the copy: a request arrives while the refill holds the turn.
        ON_FIRST_MARK.append(lambda: requests.append(ex.submit(request, priority=Priority.DEFAULT)))
        refill = ready.refill(ex)
        assert refill is not None
        refill.result(timeout=10)
        assert ready.ready
        requests[0].result(timeout=10)
        assert LOG in (["a", "request", "b"], ["b", "request", "a"]), \
            f"{LOG}: the request waited for the whole copy"

        spare = ex.submit(ready.take, SPEC, None).result(timeout=10)
        assert isinstance(spare, Net)
        assert spare.head.weight is spare.embed.weight
        assert spare.embed.weight.device.type == "meta"
        pristine = ready._pristine
        assert isinstance(pristine, Net)
        ours = dict(spare.named_parameters(remove_duplicate=False))
        theirs = dict(pristine.named_parameters(remove_duplicate=False))
        assert ours.keys() == theirs.keys()
        for name, p in ours.items():
            assert p is not theirs[name] and p.shape == theirs[name].shape and p.dtype == theirs[name].dtype, name
        assert {id(m) for m in spare.modules()}.isdisjoint(id(m) for m in pristine.modules())
    finally:
        ON_FIRST_MARK.clear()
        ex.stop()


def test_a_refill_whose_model_changed_while_it_yielded_keeps_no_stale_spare() -> None:
    """A load of another spec (take: the key changed) runs during the refill's yield: the copy
    of the old skeleton must not become the new spec's spare."""
    ex = Executor()
    ex.start()
    try:
        ready = ReadySkeleton("m")
        ready.wanted = True
        ex.submit(ready.build, SPEC, None).result(timeout=10)
        ex.submit(ready.take, SPEC, None).result(timeout=10)
        other = ModelSpec("factory", f"{__name__}:make_net", {"kwargs": {}}, [])
        taken: list[Any] = []
        ON_FIRST_MARK.append(lambda: taken.append(
            ex.submit(ready.take, other, torch.bfloat16, priority=Priority.DEFAULT)))
        LOG.clear()
        refill = ready.refill(ex)
        assert refill is not None
        refill.result(timeout=10)
        assert taken[0].result(timeout=10) is None  # the key changed: that load builds its own
        assert not ready.ready, "a copy of the old skeleton was kept as the spare"
    finally:
        ON_FIRST_MARK.clear()
        ex.stop()
