"""A Ray Serve model replica's start: ready for Ray at once, the engine started behind it.

``CicadaModels.__init__`` (``ray_serve``) makes a ``ReplicaStart`` and returns. Ray counts a
replica as started when its constructor returns and only then routes to it, so a constructor
that imports torch and transformers (seconds) holds the first request back by all of that plus
Ray's own routing update. Here the imports and the data plane's start run behind a ready
replica instead:

- a thread imports torch and the engine (torch's import releases the GIL in its native parts
  and Ray's own start-up is mostly in C++ threads, so little of it is lost to the GIL), then
  the data plane is entered on the replica's event loop; the engine then imports transformers
  and builds each model's skeleton on its executor, as in ``cicada serve``;
- a request that arrives before that is done starts reading its model's weights into the page
  cache at once (``engine/prefetch.py``: stdlib only, no torch), so the read overlaps the
  imports instead of following them; the engine's load then finds the pages there;
- requests wait for the data plane, then go on as on a started replica. A start that failed
  fails every request with its error, and Ray's health check (``failed``) replaces the replica.

Nothing here imports torch, aiohttp or the data plane at module level: the replica's
constructor must stay cheap. The engine factory and arena set-up come from ``enginesetup``, as
``cicada serve``'s do, since ``service/server.py`` imports aiohttp at its top.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack, suppress
from typing import TYPE_CHECKING

# The same engine as `cicada serve`'s, from a module that does not import aiohttp.
from cicada_async.service.enginesetup import default_engine_factory as engine_factory
from cicada_async.service.enginesetup import few_malloc_arenas

if TYPE_CHECKING:
    from cicada_async.service.config import Config
    from cicada_async.service.dataplane import DataPlane

log = logging.getLogger(__name__)


def _import_engine(threads: int) -> float:
    """torch and the engine's modules, in a worker thread; the seconds it took."""
    from cicada_async.engine import importgc  # stdlib only

    t0 = time.perf_counter()
    few_malloc_arenas()  # before torch starts threads that would each take an arena
    with importgc.paused():  # importgc says why (the collector's passes over the imports)
        import torch

        torch.set_num_threads(threads)
        import cicada_async.engine.runtime  # noqa: F401 - the engine factory's module
        import cicada_async.service.dataplane  # noqa: F401
        import protocols.v2  # noqa: F401 - the replica's decode/encode
    return time.perf_counter() - t0


class ReplicaStart:
    """The data plane of one replica, being started; made on the replica's event loop."""

    def __init__(self, config: Config, threads: int) -> None:
        self.config = config
        self.dp: DataPlane | None = None
        self.prefetched: dict[str, object] = {}  # model -> its early page-cache read
        self.import_s: float | None = None
        self._stack = AsyncExitStack()
        self._task = asyncio.get_running_loop().create_task(self._start(threads), name="cicada replica start")

    async def _start(self, threads: int) -> DataPlane:
        self.import_s = await asyncio.to_thread(_import_engine, threads)
        from cicada_async.service.dataplane import DataPlane

        self.dp = await self._stack.enter_async_context(DataPlane(self.config, engine_factory))
        return self.dp

    async def data_plane(self, model: str | None) -> DataPlane:
        """The started data plane; before it is, ``model``'s weights start into the page cache."""
        if self.dp is not None:
            return self.dp
        if model:
            self._prefetch(model)
        return await asyncio.shield(self._task)

    def _prefetch(self, model: str) -> None:
        """Read ``model``'s local weights into the page cache while the imports run (once)."""
        cfg = self.config.models.get(model)
        if cfg is None or model in self.prefetched:
            return
        from cicada_async.engine import prefetch  # stdlib only

        d = prefetch.local_dir(cfg.uri)
        if d is None or not d.is_dir():  # remote: the engine's fetch reads it (prefetch.py says why)
            return
        try:
            self.prefetched[model] = prefetch.prefetch_dirs([d])
        except OSError as e:  # an optimization only: the load reads the files and says what failed
            log.warning("early read of %s's weights failed: %s", model, e)

    def failed(self) -> BaseException | None:
        """Why the start failed, once it has (Ray's health check then replaces the replica)."""
        if not self._task.done():
            return None
        return asyncio.CancelledError("the start was cancelled") if self._task.cancelled() else self._task.exception()

    async def close(self) -> None:
        """Drain and tear down what was started (also a start still under way)."""
        if not self._task.done():
            self._task.cancel()
            with suppress(BaseException):
                await self._task
        if self.dp is not None:
            self.dp.begin_drain()
        await self._stack.aclose()
