"""``cicada.manifest.json``: per-file sizes and SHA-256 digests, parsed and checked.

Ranged reads carry no whole-object checksum (S3 ETags are not digests), so a packed model
carries its own; the engine verifies every file against it before the load counts as done.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
import json
import logging
from typing import TYPE_CHECKING, Any

from protocols.errors import CheckpointError, IntegrityError
from protocols.manifest import FileHeader

if TYPE_CHECKING:
    from cicada_async.engine.landing import Landing

log = logging.getLogger(__name__)

MANIFEST_NAME = "cicada.manifest.json"


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def load_manifest(data: bytes) -> dict[str, Any]:
    """Parse and check a ``cicada.manifest.json``; CheckpointError when it is malformed."""
    from backends._remote import check_key  # the same key rules as the storage backends
    from protocols.errors import StorageError

    try:
        manifest = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{MANIFEST_NAME} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{MANIFEST_NAME} has no 'files' table")
    for key, entry in manifest["files"].items():
        try:
            check_key(key)
        except StorageError as e:
            raise CheckpointError(f"{MANIFEST_NAME}: {e}") from None
        size, digest = (entry or {}).get("size"), (entry or {}).get("sha256")
        if not (isinstance(size, int) and size >= 0 and not isinstance(size, bool)):
            raise CheckpointError(f"{MANIFEST_NAME}: {key!r} has no valid size")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")):
            raise CheckpointError(f"{MANIFEST_NAME}: {key!r} has no valid sha256")
    order = manifest.setdefault("order", [])
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        raise CheckpointError(f"{MANIFEST_NAME}: 'order' is not a list of tensor names")
    return manifest


def verify(file_key: str, buffer: memoryview | bytes | bytearray, manifest: dict[str, Any]) -> None:
    """IntegrityError unless ``buffer`` is exactly the file the manifest describes."""
    verify_chunks(file_key, [memoryview(buffer).cast("B")], manifest)


def verify_chunks(file_key: str, chunks: Iterable[memoryview], manifest: dict[str, Any]) -> None:
    """IntegrityError unless ``chunks``, in order, are exactly the file the manifest describes."""
    entry = manifest["files"].get(file_key)
    if entry is None:
        raise IntegrityError(f"{file_key} is not in {MANIFEST_NAME}")
    h, size = hashlib.sha256(), 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        size += len(view)
        if size > entry["size"]:
            break
        h.update(view)
    if size != entry["size"]:
        raise IntegrityError(f"{file_key}: {size}{'+' if size > entry['size'] else ''} bytes, the manifest says {entry['size']}")
    digest = h.hexdigest()
    if digest != entry["sha256"]:
        raise IntegrityError(f"{file_key}: SHA-256 {digest} does not match the manifest")


# Whole-file hashes take seconds for large models: on a pool of their own, bounded, so that
# they never queue ahead of (or behind) the default pool's disk reads and body codecs.
HASH_THREADS = 2
_hashing = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="cicada-hash")


async def verify_files(landing: Landing, hdrs: dict[str, FileHeader], manifest: dict[str, Any]) -> None:
    """Check every weight file against the manifest's sha256 (``cicada pack`` writes it)."""
    # hashlib releases the GIL on large buffers: files hash in parallel with compute. The bytes
    # are fetched in the thread too: on CUDA that is a stream synchronize and device-to-host
    # copies through one bounded host buffer per file, which must not block the loop.
    def check(key: str, header: FileHeader) -> None:
        verify_chunks(key, landing.file_chunks(key, header), manifest)

    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(_hashing, check, k, h) for k, h in hdrs.items()))
