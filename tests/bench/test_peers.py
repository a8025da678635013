"""download-then-load streams every piece to its offset: the files land byte-identical."""

from __future__ import annotations

import asyncio
import os
from contextlib import ExitStack
from pathlib import Path

from cicada_async.bench.origins import start_http_origin
from cicada_async.bench.peers import CHUNK, _download


def test_download_writes_every_piece_at_its_offset(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "m").mkdir(parents=True)
    blobs = {"a.bin": os.urandom(3 * CHUNK + 12345), "b.bin": os.urandom(100)}
    for name, data in blobs.items():
        (root / "m" / name).write_bytes(data)
    for p in (tmp_path, root, root / "m"):
        os.chmod(p, 0o755)
    dst = tmp_path / "dst"
    dst.mkdir()
    (tmp_path / "srv").mkdir()
    with ExitStack() as stack:
        base, _ = start_http_origin(root, tmp_path / "srv", stack)
        n = asyncio.run(_download(f"{base}/m/", {}, list(blobs), dst))
    assert n == sum(len(b) for b in blobs.values())
    for name, data in blobs.items():
        assert (dst / name).read_bytes() == data
