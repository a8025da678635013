"""The benchmarks' S3 origin (rclone's ``serve s3``, the default) serves what our S3 backend asks
of it: HEAD with an ETag, ranged presigned GETs with If-Match, exactly the uploaded bytes; and
its objects live under ``S3_DATA``, the directory the benchmarks drop from the page cache."""

from __future__ import annotations

import asyncio
import hashlib
import os
from contextlib import ExitStack
from pathlib import Path

import pytest

from backends import open_backend
from cicada_async.bench.origins import BUCKET, S3_DATA, start_s3, upload_s3

pytestmark = pytest.mark.timeout(120)


async def _read(endpoint: str, creds: dict[str, str], key: str, size: int) -> tuple[bytes, str | None]:
    # A small chunk size so the object comes back in several concurrent ranged GETs.
    backend = open_backend(f"s3://{BUCKET}/m", {"endpoint_url": endpoint, "region": "us-east-1",
                                                "addressing_style": "path", "chunk_bytes": 1 << 20, **creds})
    try:
        info = await backend.stat(key)
        assert info.size == size
        buf = bytearray(size)
        await backend.read_into(key, 0, memoryview(buf))
        return bytes(buf), info.version
    finally:
        await backend.aclose()


def test_rclone_origin_serves_our_backend_the_uploaded_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CICADA_BENCH_S3", "rclone")
    data = os.urandom(5 * (1 << 20) + 4321)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(data)
    (tmp_path / "srv").mkdir()
    with ExitStack() as stack:
        endpoint, name, creds = start_s3(tmp_path / "srv", stack)
        assert name == "rclone"
        upload_s3(endpoint, creds, {"m": tmp_path / "m"})
        got, etag = asyncio.run(_read(endpoint, creds, "w.bin", len(data)))
        stored = list((tmp_path / "srv" / S3_DATA).rglob("w.bin"))
    assert got == data
    assert etag is not None and hashlib.md5(data).hexdigest() in etag  # noqa: S324 - S3's ETag is an MD5
    assert len(stored) == 1 and stored[0].read_bytes() == data  # the bytes the benches evict
