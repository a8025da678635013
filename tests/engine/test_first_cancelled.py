"""A first request cancelled while its load runs leaves no answer behind (review-3 C-14).

The load still computes that request's outputs; nobody will read them, and the instance must
not keep them (outside every memory budget) until the next load or unload.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

from cicada_async.engine.runtime import Engine, ModelOptions
from tests.fixtures.helpers import inputs_for

pytestmark = pytest.mark.timeout(120)


async def test_a_cancelled_first_request_leaves_no_outputs(model_dirs: dict[str, Path]) -> None:
    d = model_dirs["tiny-gpt2"]
    gc.disable()  # reachability by reference counts alone
    try:
        async with Engine(storage={"memory": {"delay_s": 0.02}}, read_bytes=8192) as engine:
            inst = engine.instance("m", f"memory://{d}", ModelOptions())
            first = asyncio.create_task(inst.infer(inputs_for(d)))
            while inst._first_outputs is None:
                await asyncio.sleep(0.001)
            answer = weakref.ref(inst._first_outputs)  # what will carry the first outputs
            await asyncio.sleep(0.05)
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            del first  # its CancelledError's traceback holds the request's frame
            await inst.load()  # the load goes on without the request and succeeds
            assert inst.state == "ready"
            await asyncio.sleep(0)
            assert answer() is None, "the cancelled request's outputs are still held"
    finally:
        gc.enable()
