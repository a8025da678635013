"""S3's threaded byte path trusts the CAs its aiobotocore client trusts (review-3 W-1(6)).

botocore resolves ``ca_bundle`` from ``AWS_CA_BUNDLE`` or the profile's ``ca_bundle`` key. The
threads read only the variable before, so with the key in the profile (how a private S3
endpoint's CA is usually configured) the client's HEADs verified and every threaded GET failed
its TLS handshake. The oracle is a real handshake with a TLS origin whose self-signed
certificate only the profile's bundle holds.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from backends.s3 import S3Backend
from tests.storage.scripted import BIG, DATA, answer, scripted, self_signed  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(60)


async def test_threads_trust_the_profiles_ca_bundle(scripted: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, tls = self_signed(tmp_path)

    def plain(conn: socket.socket, first: int, last: int) -> None:
        conn.sendall(answer(first, last) + DATA[first : last + 1])

    origin = scripted(plain, tls)
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nregion = us-east-1\nca_bundle = {cert}\n")
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    backend = S3Backend.from_uri("s3://bucket/m", {"endpoint_url": f"https://127.0.0.1:{origin.port}"})
    try:
        await backend._get_client()  # the client, and the trust its session resolved
        assert backend._threads is not None
        pool = backend._threads.pool
        resp = await asyncio.to_thread(pool.get, f"{origin.uri}{BIG}", {"Range": "bytes=0-9"}, max_redirects=0)
        try:
            assert resp.status == 206  # the handshake with the profile's CA went through
        finally:
            await asyncio.to_thread(resp.release)
    finally:
        await backend.aclose()
