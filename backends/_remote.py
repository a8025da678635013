"""Shared pieces of the network backends: key checks, settings, chunking and resumable reads."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from protocols.errors import ConfigError, IntegrityError, StorageError, StorageTimeout

MiB = 1 << 20

# Characters that have no business in a model-relative key: control bytes, and the URL
# delimiters that would let a key turn into a query or a fragment.
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f?#\\]")


def check_key(key: str) -> str:
    """``key`` if it is a plain relative path inside the model root, else StorageError.

    Percent-decoding is applied repeatedly before the checks so that ``%2e%2e`` or
    ``%252e%252e`` cannot reach a server that decodes once more than we do.
    """
    forms = [key]
    while True:
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    for form in forms:
        parts = form.split("/")
        if (
            not form
            or form.startswith("/")
            or _BAD_KEY_CHARS.search(form)
            or any(p in ("", ".", "..") for p in parts)
            or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", form)  # "http:..." or "C:..."
        ):
            raise StorageError(f"storage key {key!r} is not a relative path inside the model")
    if len(forms) > 1:
        # A key is a name, not an already-encoded URL path; we do the encoding.
        raise StorageError(f"storage key {key!r} must not be percent-encoded")
    return key


@dataclass(frozen=True)
class RemoteSettings:
    """Settings every network backend shares; each backend documents its own extras."""

    concurrency: int = 8
    """Ranged requests in flight at once, per backend instance."""
    chunk_bytes: int = 8 * MiB
    """A read_into larger than this is split into ranged requests of this size."""
    connect_timeout_s: float = 10.0
    """Time allowed to open a connection."""
    read_timeout_s: float = 30.0
    """Longest silence allowed while waiting for headers or for the next body bytes."""
    max_attempts: int = 5
    """Attempts per request for retryable statuses and connection errors (1 = no retry)."""
    resume_attempts: int = 5
    """Re-issued ranged requests per chunk after the body broke off (dropped, short, stalled)."""
    backoff_s: float = 0.1
    """First retry delay; doubles each time, with jitter, capped at ``backoff_max_s``."""
    backoff_max_s: float = 2.0
    data_path: str = "threads"
    """"threads": bodies land from worker threads by recv_into (backends._threadfetch);
    "loop": the library client (aiohttp, aiobotocore) on the event loop, the older path."""

    @classmethod
    def take(cls, settings: dict[str, Any], **defaults: Any) -> "RemoteSettings":
        """Pop the shared keys from ``settings`` (so leftovers can be flagged as unknown);
        ``defaults`` are a backend's own defaults (measured per backend, docs/storage.md)."""
        values: dict[str, Any] = dict(defaults)
        for name, default in cls.__dataclass_fields__.items():
            if name in settings:
                raw = settings.pop(name)
                kind: Callable[[Any], object] = type(default.default)  # every field has a plain default
                try:
                    values[name] = kind(raw)
                except (TypeError, ValueError):
                    raise ConfigError(f"storage setting {name}={raw!r} is not a {type(default.default).__name__}")
        made = cls(**values)
        if made.concurrency < 1 or made.chunk_bytes < 1 or made.max_attempts < 1:
            raise ConfigError("concurrency, chunk_bytes and max_attempts must be at least 1")
        if made.resume_attempts < 0 or made.connect_timeout_s <= 0 or made.read_timeout_s <= 0:
            raise ConfigError("timeouts must be positive and resume_attempts not negative")
        if made.data_path not in ("threads", "loop"):
            raise ConfigError(f"data_path must be 'threads' or 'loop', not {made.data_path!r}")
        return made

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): full jitter avoids lockstep."""
        return random.uniform(0, min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))


def reject_unknown(settings: Mapping[str, Any], backend: str) -> None:
    """A misspelt setting would silently fall back to a default; refuse it instead."""
    if settings:
        raise ConfigError(f"unknown {backend} storage settings: {', '.join(sorted(settings))}")


def chunks(offset: int, length: int, chunk: int) -> list[tuple[int, int]]:
    """``(relative start, relative end)`` pairs cutting ``length`` bytes into ``chunk``-sized pieces."""
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)] or [(0, 0)]


class Transient(Exception):
    """A body that broke off; resumable from the bytes already landed."""

    def __init__(self, message: str, *, timeout: bool = False, short: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.short = short


@dataclass
class Fill:
    """The bytes of one chunk landed so far; ``got`` only grows."""

    view: memoryview
    offset: int  # object offset of view[0]
    got: int = 0

    @property
    def pos(self) -> int:
        return self.offset + self.got

    @property
    def missing(self) -> int:
        return len(self.view) - self.got

    def land(self, data: bytes | memoryview) -> int:
        """Copy as much of ``data`` as fits; returns how many bytes were taken."""
        n = min(len(data), self.missing)
        self.view[self.got : self.got + n] = data[:n]
        self.got += n
        return n


async def fill_resuming(
    fill: Fill,
    read_once: Callable[[Fill], Awaitable[None]],
    settings: RemoteSettings,
    what: str,
) -> None:
    """Call ``read_once`` until ``fill`` is full; each call resumes from ``fill.pos``.

    ``read_once`` lands bytes through ``fill.land`` and raises Transient when the body broke
    off; anything else it raises is final. Bounded by ``settings.resume_attempts``.
    """
    resumes = 0
    while True:
        try:
            await read_once(fill)
        except Transient as e:
            if resumes >= settings.resume_attempts:
                detail = f"{what}: gave up after {resumes + 1} attempts, {fill.got} of {len(fill.view)} bytes landed: {e}"
                if e.timeout:
                    raise StorageTimeout(detail) from e
                if e.short:
                    raise IntegrityError(detail) from e
                raise StorageError(detail) from e
            resumes += 1
            await asyncio.sleep(settings.backoff(resumes))
            continue
        if fill.missing:
            # read_once must either fill or raise; a quiet short return is a bug upstream of us.
            raise IntegrityError(f"{what}: {fill.missing} bytes missing at offset {fill.pos}")
        return


async def gather_chunks(
    view: memoryview,
    offset: int,
    settings: RemoteSettings,
    sem: asyncio.Semaphore,
    read_chunk: Callable[[Fill], Awaitable[None]],
) -> None:
    """Read ``view`` as chunk-sized pieces, at most ``sem``'s worth in flight.

    A TaskGroup cancels the siblings of the first failing chunk, so a failed read returns
    promptly and leaves no request running behind the caller's back.
    """

    async def one(fill: Fill) -> None:
        async with sem:
            await read_chunk(fill)

    pieces = chunks(offset, len(view), settings.chunk_bytes)
    if len(pieces) == 1:
        await one(Fill(view, offset))
        return
    try:
        async with asyncio.TaskGroup() as tg:
            for s, e in pieces:
                tg.create_task(one(Fill(view[s:e], offset + s)))
    except BaseExceptionGroup as group:
        # Surface one error of our hierarchy (the first), not a group the caller can't catch.
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
