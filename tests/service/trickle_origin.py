"""An HTTP origin that trickles weight files (512 B per 0.25 s), or never answers for them.

HEAD, Range and ETag as the HTTP backend needs them; runs on its own loop in a thread. A cold
start from it takes minutes, which is what shutdown-during-load tests need.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

from aiohttp import web

CHUNK, PAUSE_S = 512, 0.25


class TrickleOrigin:
    def __init__(self, root: Path, *, never: bool = False) -> None:
        self.root = root
        self.never = never  # weight files: headers never sent, not a byte
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="trickle-origin", daemon=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rest = request.match_info["rest"]
        path = (self.root / rest).resolve()
        if ".." in rest or not path.is_file():
            return web.Response(status=404)
        data = path.read_bytes()
        headers = {"Accept-Ranges": "bytes", "ETag": '"v1"'}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        status, a, b = 200, 0, len(data) - 1
        m = re.match(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if m:
            a, b = int(m.group(1)), min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            status, headers["Content-Range"] = 206, f"bytes {a}-{b}/{len(data)}"
        body = data[a:b + 1]
        if not rest.endswith(".safetensors"):
            return web.Response(status=status, body=body, headers=headers)
        if self.never:
            await asyncio.Event().wait()
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        for i in range(0, len(body), CHUNK):
            await resp.write(body[i:i + CHUNK])
            await asyncio.sleep(PAUSE_S)
        return resp

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{rest:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> TrickleOrigin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(15)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)
