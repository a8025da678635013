"""Presigned URLs that die with their credentials (review-3 C-18): an origin in front of moto
refuses, as S3 does for dead session credentials, every presigned GET signed before a cut-off
(moto itself checks no expiry). A cached URL that is refused is signed again, once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from backends import open_backend
from protocols.errors import StorageError
from protocols.storage import StorageBackend
from tests.fixtures.storage import S3Model

pytestmark = pytest.mark.timeout(60)

BIG = "model.safetensors"
_EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
            b"<Message>The provided token has expired.</Message></Error>")
_PASSED = ("etag", "content-range", "content-type", "last-modified", "accept-ranges")


@dataclass
class ExpiringFront:
    """Forwards to moto; refuses presigned GETs whose X-Amz-Date is not after ``cutoff``."""

    upstream: str
    cutoff: str = ""  # X-Amz-Date form, 20261207T055012Z; "" refuses nothing
    url: str = ""
    refused: int = 0
    passed_dates: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        date = request.query.get("X-Amz-Date")
        if request.method == "GET" and date is not None and date <= self.cutoff:
            self.refused += 1
            return web.Response(status=403, body=_EXPIRED, content_type="application/xml")
        if date is not None:
            self.passed_dates.append(date)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "connection")}
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            async with session.request(request.method, self.upstream + request.path_qs,
                                       headers=headers) as up:
                body = await up.read()
                out = {k: v for k, v in up.headers.items() if k.lower() in _PASSED}
                if request.method == "HEAD":
                    out["Content-Length"] = up.headers.get("Content-Length", "0")
                    return web.Response(status=up.status, headers=out)
                return web.Response(status=up.status, body=body, headers=out)


@pytest_asyncio.fixture
async def front(s3_model: S3Model) -> AsyncIterator[ExpiringFront]:
    made = ExpiringFront(s3_model.endpoint.rstrip("/"))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", made.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    made.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield made
    finally:
        await runner.cleanup()


def _amz_now() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _backend(model: S3Model, front: ExpiringFront, chunk_bytes: int) -> StorageBackend:
    return open_backend(model.uri, {
        "endpoint_url": front.url, "region": "us-east-1", "chunk_bytes": chunk_bytes,
        "concurrency": 2, "read_timeout_s": 5, "backoff_s": 0.01, "data_path": "threads"})


async def test_a_cached_url_refused_as_expired_is_signed_again(
    s3_model: S3Model, front: ExpiringFront
) -> None:
    backend = _backend(s3_model, front, 64 << 10)
    data = s3_model.files[BIG]
    try:
        info = await backend.stat(BIG)
        buf = bytearray(len(data))
        await asyncio.wait_for(backend.read_into(BIG, 0, memoryview(buf), version=info.version), 20)
        assert bytes(buf) == data and front.refused == 0
        # The credentials that signed the cached URL die now (well inside its 600 s of reuse).
        front.cutoff = _amz_now()
        await asyncio.sleep(1.1)  # a URL signed from here on is dated after the cut-off
        buf = bytearray(len(data))
        await asyncio.wait_for(backend.read_into(BIG, 0, memoryview(buf), version=info.version), 20)
    finally:
        await backend.aclose()
    assert bytes(buf) == data  # every byte, as moto holds it
    assert front.refused >= 1  # the cached URL was tried and refused
    assert max(front.passed_dates) > front.cutoff  # and a fresh one carried the read


async def test_a_fresh_url_refused_too_is_final(s3_model: S3Model, front: ExpiringFront) -> None:
    """Credentials that stay dead: one re-sign per chunk, then the S3 error, no loop."""
    backend = _backend(s3_model, front, 64 << 20)  # one chunk
    front.cutoff = "99991231T235959Z"
    try:
        with pytest.raises(StorageError, match="ExpiredToken"):
            await asyncio.wait_for(backend.read_into(BIG, 0, memoryview(bytearray(1000))), 20)
    finally:
        await backend.aclose()
    assert front.refused == 2
