"""Unload lets go of the model on the executor thread, never on the event loop.

Freeing a loaded model unmaps or frees its weights (hundreds of ms for GB arenas); on the loop
that stalls every request and health check meanwhile.
"""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import pytest

from cicada_async.engine.runtime import Engine, ModelOptions
from tests.fixtures.helpers import inputs_for

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("uri", ["file", "memory"])
async def test_the_model_is_freed_on_the_executor_thread(model_dirs: dict[str, Path], uri: str) -> None:
    d = model_dirs["tiny-gpt2"]
    freed_on: list[str] = []
    gc.disable()  # only reference counting: where the last reference goes is where it is freed
    try:
        async with Engine() as engine:
            inst = engine.instance("m", str(d) if uri == "file" else f"memory://{d}", ModelOptions())
            await inst.infer(inputs_for(d))
            assert inst._model is not None
            weakref.finalize(inst._model, lambda: freed_on.append(threading.current_thread().name))
            await inst.unload()
            assert freed_on, "the model outlived its unload"
            assert freed_on[0].startswith("cicada-executor"), freed_on
            assert threading.current_thread().name not in freed_on
    finally:
        gc.enable()
