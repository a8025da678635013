"""transformers' names, resolved under one process-wide lock.

transformers is a lazy module: ``transformers.X`` imports X's submodule on first access. That
is not thread-safe: while one thread is importing (the engine warms the import on its executor
at start), another thread's first ``transformers.PreTrainedTokenizerFast`` raised
``AttributeError: module 'transformers' has no attribute ...`` (reproduced 3 of 3 times), and
``getattr(transformers, name, None)`` silently answered None. A scale-from-zero request arrives
exactly then: the tokenizer build failed with a 500, and the pad-token probe turned padding
off. Every thread that resolves a transformers name outside the executor's turn goes through
``attr``; the warm import holds the same lock, so a caller waits for it instead of racing it.

A name that imports (transformers itself, a model class's first use) is imported with the
cyclic collector paused (``importgc``: 0.5 of transformers' ~2.1 s import was the collector);
a name already resolved is a dictionary look-up and pauses nothing.
"""

from __future__ import annotations

import sys
import threading

from cicada_async.engine import importgc

_lock = threading.RLock()


def attr(name: str) -> object:
    """``transformers.<name>`` (AttributeError when it has none), after any import in flight."""
    with _lock:
        done = sys.modules.get("transformers")
        if done is not None and name in vars(done):  # the lazy module keeps what it resolved
            return vars(done)[name]
        # Called from a load (a model class's first use in the skeleton build): no freeze, see
        # importgc for the mapping an unloaded model kept when this froze the load's frames.
        with importgc.paused(freeze=False):
            import transformers

            return getattr(transformers, name)


def find(name: str) -> object | None:
    """``transformers.<name>``, or None when it has none (after any import in flight)."""
    try:
        return attr(name)
    except AttributeError:
        return None


def warm() -> None:
    """Import transformers and its model base class now (an idle thread at start)."""
    with _lock, importgc.paused():
        import transformers

        transformers.PreTrainedModel  # noqa: B018 - the lazy module loads on first access
