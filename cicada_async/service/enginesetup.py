"""A serving process's engine and its malloc set-up, shared by ``cicada serve`` (``server``)
and each Ray Serve model replica (``ray_replica``).

Apart from ``server`` because that module imports aiohttp at its top, which a Ray replica's
start must not pay; nothing here imports more than ctypes until the engine is made.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from cicada_async.service.config import Config
    from protocols.serving import ServingEngine


def default_engine_factory(config: Config) -> AbstractAsyncContextManager[ServingEngine]:
    from cicada_async.engine.runtime import Engine  # deferred: heavy imports only when serving

    return Engine(storage=config.storage, node_cache=config.node_cache, plan_dir=config.cache.plan_dir,
                  shared=not config.server.serialize_loads, every_core_when_idle=config.server.torch_threads is None)


def few_malloc_arenas() -> None:
    """Caps glibc's malloc arenas at two (``mallopt(M_ARENA_MAX, 2)``); a no-op without glibc.
    Part of a serving process's set-up: ``server.main`` calls it, and so does each Ray Serve
    model replica (``ray_replica``) before torch starts its threads.

    The engine's worker threads take turns computing, and glibc would give each thread its own
    arena: the activations one worker frees stay in its arena, where the next forward (often on
    another worker) does not reuse them, so RSS after a model's unload can keep growing with the
    number of workers that ever computed. With two arenas the workers share freed memory."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
