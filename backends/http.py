"""HTTP(S) backend on aiohttp: ranged GETs under a root URL, streamed into caller buffers."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from backends._remote import (
    MiB,
    Fill,
    RemoteSettings,
    Transient,
    check_key,
    fill_resuming,
    gather_chunks,
    reject_unknown,
)
from backends._threadfetch import ThreadFetch
from backends._wire import CROSS_ORIGIN_HEADERS, REDIRECTS
from backends._wireresp import Response
from protocols.errors import (
    ConfigError,
    IntegrityError,
    ObjectChanged,
    ObjectNotFound,
    StorageError,
    StorageTimeout,
)
from protocols.storage import ObjectInfo

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_READ_PIECE = 1 * MiB
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# HEAD is refused by some origins (S3 presigned GET URLs answer 403, some CDNs 405).
_HEAD_REFUSED = frozenset({400, 403, 405, 501})
_MAX_RETRY_AFTER_S = 10.0
# A version that is not an ETag: the origin sent only Last-Modified.
_LM_PREFIX = "last-modified:"


@contextlib.contextmanager
def map_exceptions(what: str) -> Iterator[None]:
    """Turn aiohttp/OS failures of a request into our errors."""
    try:
        yield
    except aiohttp.TooManyRedirects as e:
        raise StorageError(f"{what}: too many redirects") from e
    except TimeoutError as e:
        raise StorageTimeout(f"{what}: timed out") from e
    except (aiohttp.ClientError, OSError) as e:
        raise StorageError(f"{what}: {type(e).__name__}: {e}") from e


class _RedirectRefused(StorageError):
    """Too many redirects, or one from https to http: final, not retried."""


def _status_error(status: int, what: str) -> StorageError:
    if status in (404, 410):
        return ObjectNotFound(f"{what}: HTTP {status}")
    if status == 412:
        return ObjectChanged(f"{what}: the object was replaced (ETag no longer matches)")
    if status == 416:
        return IntegrityError(f"{what}: the object is shorter than the range asked (HTTP 416)")
    return StorageError(f"{what}: HTTP {status}")


def _version_of(headers: Mapping[str, str]) -> str | None:
    etag = headers.get("ETag")
    if etag:
        return etag
    modified = headers.get("Last-Modified")
    return _LM_PREFIX + modified if modified else None


class HTTPBackend:
    """Objects under a root URL ``http(s)://host/path/``; keys are paths relative to it.

    Settings beyond the shared ones (see ``backends._remote.RemoteSettings``): headers,
    max_redirects, trust_env, op_timeout_s.
    """

    alignment = 1

    def __init__(
        self,
        root: str,
        settings: RemoteSettings,
        *,
        headers: dict[str, str] | None = None,
        max_redirects: int = 5,
        trust_env: bool = False,
    ) -> None:
        self.root = root if root.endswith("/") else root + "/"
        self.settings = settings
        self.max_redirects = max_redirects
        self.trust_env = trust_env
        # Weight bytes must arrive as stored: a compressed body cannot be ranged or landed.
        self.headers = {**(headers or {}), "Accept-Encoding": "identity"}
        s = settings
        # Bounds one request up to its headers, redirects included; aiohttp's own sock_connect
        # and sock_read timers normally fire first.
        self._head_timeout_s = (max_redirects + 1) * (s.connect_timeout_s + s.read_timeout_s)
        self._sem = asyncio.Semaphore(s.concurrency)
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # None until the origin has answered a ranged GET: True if it sends 206, False if it
        # ignores Range (200), after which each read_into streams the object once.
        self.ranges_supported: bool | None = None
        # Bodies land from worker threads (backends._threadfetch); HEAD and the rest stay on
        # aiohttp. trust_env means proxies from the environment, which only aiohttp speaks.
        self._threads: ThreadFetch | None = None
        if s.data_path == "threads" and not trust_env:
            self._threads = ThreadFetch(s, name="cicada-http", max_redirects=max_redirects)

    @classmethod
    def from_uri(cls, uri: str, settings: dict[str, Any]) -> "HTTPBackend":
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise ConfigError(f"expected http(s)://host/path/, got {uri!r}")
        if parts.query:
            raise ConfigError(f"the root URL {uri!r} must not carry a query")
        rest = dict(settings)
        shared = RemoteSettings.take(rest, concurrency=16)  # measured: docs/storage.md
        headers = rest.pop("headers", None) or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError("http storage setting 'headers' must be a table of strings")
        backend = cls(
            uri,
            shared,
            headers=headers,
            max_redirects=int(rest.pop("max_redirects", 5)),
            trust_env=bool(rest.pop("trust_env", False)),
        )
        reject_unknown(rest, "http")
        return backend

    def url(self, key: str) -> URL:
        check_key(key)
        return URL(self.root + quote(key, safe="/"), encoded=True)

    async def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily so that it belongs to the running loop.
        if self._session is not None:
            return self._session
        async with self._lock:
            if self._closed:
                raise StorageError("the HTTP backend is closed")
            if self._session is None:
                s = self.settings
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s
                    ),
                    connector=aiohttp.TCPConnector(limit=s.concurrency + 2),
                    auto_decompress=False,
                    trust_env=self.trust_env,
                )
        return self._session

    async def _request(
        self, method: str, url: URL, headers: dict[str, str], what: str
    ) -> aiohttp.ClientResponse:
        """Send until the answer is not a retryable failure; the caller must close it."""
        session = await self._get_session()
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            try:
                with map_exceptions(what):
                    async with asyncio.timeout(self._head_timeout_s):
                        resp = await self._follow(session, method, url, headers, what)
            except StorageError as e:
                if isinstance(e, _RedirectRefused) or attempt >= s.max_attempts:
                    raise
                await asyncio.sleep(s.backoff(attempt))
                continue
            if resp.status in _RETRY_STATUSES and attempt < s.max_attempts:
                delay = s.backoff(attempt)
                with contextlib.suppress(ValueError):
                    delay = min(float(resp.headers.get("Retry-After", "")), _MAX_RETRY_AFTER_S)
                resp.close()
                await asyncio.sleep(delay)
                continue
            return resp

    async def _follow(
        self, session: aiohttp.ClientSession, method: str, url: URL, headers: dict[str, str], what: str
    ) -> aiohttp.ClientResponse:
        """One request and its redirects, hop by hop, with the threaded client's policy
        (``backends._wire``): aiohttp's own drops only Authorization across origins and follows
        https -> http. Another origin gets only the request's own headers; a downgrade is refused."""
        first = url.origin()
        for _ in range(self.max_redirects + 1):
            sent = {**self.headers, **headers}
            if url.origin() != first:
                sent = {k: v for k, v in sent.items() if k.lower() in CROSS_ORIGIN_HEADERS}
            resp = await session.request(method, url, headers=sent, allow_redirects=False)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECTS or not location:
                return resp
            resp.release()
            target = url.join(URL(location))
            if url.scheme == "https" and target.scheme != "https":
                raise _RedirectRefused(f"{what}: refusing a redirect from https to {target}")
            url = target
        raise _RedirectRefused(f"{what}: too many redirects (more than {self.max_redirects})")

    async def stat(self, key: str) -> ObjectInfo:
        url = self.url(key)
        what = f"HEAD {url}"
        resp = await self._request("HEAD", url, {}, what)
        try:
            length = resp.headers.get("Content-Length")
            encoded = resp.headers.get("Content-Encoding", "identity") != "identity"
            if resp.status == 200 and length is not None and not encoded:
                return ObjectInfo(key=key, size=int(length), version=_version_of(resp.headers))
            if resp.status not in _HEAD_REFUSED and resp.status != 200:
                raise _status_error(resp.status, what)
        finally:
            resp.close()
        return await self._stat_by_get(key, url)

    async def _stat_by_get(self, key: str, url: URL) -> ObjectInfo:
        what = f"GET {url} bytes=0-0 (HEAD refused)"
        resp = await self._request("GET", url, {"Range": "bytes=0-0"}, what)
        try:
            version = _version_of(resp.headers)
            if resp.status == 206:
                m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
                if m is None or m[3] == "*":
                    raise IntegrityError(f"{what}: unusable Content-Range")
                return ObjectInfo(key=key, size=int(m[3]), version=version)
            if resp.status == 416:  # an empty object has no byte 0
                m = _UNSATISFIED_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
                if m is not None:
                    return ObjectInfo(key=key, size=int(m[1]), version=version)
            if resp.status == 200 and resp.headers.get("Content-Length") is not None:
                return ObjectInfo(
                    key=key, size=int(resp.headers["Content-Length"]), version=version
                )
            raise _status_error(resp.status, what)
        finally:
            resp.close()  # never read the body of a 200: it is the whole object

    async def read_into(
        self, key: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        url = self.url(key)
        if offset < 0:
            raise StorageError(f"negative offset {offset} for {url}")
        view = buf.cast("B")
        if not len(view):
            return

        async def read_chunk(fill: Fill) -> None:
            what = f"GET {url} bytes {fill.offset}-{fill.offset + len(fill.view) - 1}"
            await fill_resuming(
                fill, lambda f: self._read_once(url, f, version, what), self.settings, what
            )

        if self.ranges_supported is None:
            # Learn with one chunk whether the origin honours Range before fanning out: if it
            # does not, every concurrent chunk would stream the object from its start.
            first = min(len(view), self.settings.chunk_bytes)
            async with self._sem:
                await read_chunk(Fill(view[:first], offset))
            view, offset = view[first:], offset + first
            if not len(view):
                return
        if self.ranges_supported is False:
            async with self._sem:
                await read_chunk(Fill(view, offset))
            return
        await gather_chunks(view, offset, self.settings, self._sem, read_chunk)

    async def _read_once(self, url: URL, fill: Fill, version: str | None, what: str) -> None:
        first, last = fill.pos, fill.offset + len(fill.view) - 1
        headers = {"Range": f"bytes={first}-{last}"}
        strong_etag = version is not None and version.startswith('"')
        if strong_etag:
            assert version is not None
            # If-Match makes a replaced object fail with 412; If-Range covers origins that
            # ignore If-Match but honour If-Range (they send the new object whole, with 200).
            headers["If-Match"] = version
            headers["If-Range"] = version
        if self._threads is not None:

            def check(resp: Response) -> int:  # in the worker thread, before the body
                return self._check_answer(resp.status, resp.headers, first, last, version, what)

            await self._threads.get_into(str(url), {**self.headers, **headers}, fill, check, what)
            return
        resp = await self._request("GET", url, headers, what)
        try:
            skip = self._check_answer(resp.status, resp.headers, first, last, version, what)
            await self._stream_body(resp, fill, skip)
        finally:
            resp.close()

    def _check_answer(
        self, status: int, headers: Mapping[str, str], first: int, last: int,
        version: str | None, what: str,
    ) -> int:
        """Raises for an unusable answer; else the body bytes before ``first`` (0 for a 206)."""
        if status not in (200, 206):
            raise _status_error(status, what)
        got_version = _version_of(headers)
        if version is not None and got_version is not None and got_version != version:
            raise ObjectChanged(f"{what}: version {got_version} is no longer {version}")
        if headers.get("Content-Encoding", "identity") != "identity":
            raise IntegrityError(f"{what}: origin sent Content-Encoding {headers['Content-Encoding']}")
        if status == 206:
            self._check_content_range(headers, first, last, what)
            self.ranges_supported = True
            return 0
        # The origin ignored Range and sends the object from byte 0: skip to our offset, land
        # our slice and hang up (see docs/storage.md for the cost).
        self.ranges_supported = False
        return first

    @staticmethod
    def _check_content_range(headers: Mapping[str, str], first: int, last: int, what: str) -> None:
        header = headers.get("Content-Range", "")
        m = _CONTENT_RANGE.fullmatch(header)
        if m is None:
            raise IntegrityError(f"{what}: 206 without a usable Content-Range ({header!r})")
        if int(m[1]) != first or int(m[2]) != last:
            raise IntegrityError(
                f"{what}: asked bytes {first}-{last}, Content-Range says {header!r}"
                + (" (object shorter than expected)" if int(m[1]) == first else "")
            )
        length = headers.get("Content-Length")
        if length is not None and int(length) > last - first + 1:
            raise IntegrityError(f"{what}: Content-Length {length} exceeds the range asked")

    async def _stream_body(self, resp: aiohttp.ClientResponse, fill: Fill, skip: int) -> None:
        timeout = self.settings.read_timeout_s
        while fill.missing:
            try:
                async with asyncio.timeout(timeout):
                    piece = await resp.content.read(
                        min(skip, _READ_PIECE) if skip else min(fill.missing, _READ_PIECE)
                    )
            except TimeoutError as e:
                raise Transient(f"no body bytes for {timeout}s", timeout=True) from e
            except aiohttp.ClientError as e:
                raise Transient(f"body broke off: {type(e).__name__}: {e}") from e
            if not piece:
                raise Transient(f"body ended {fill.missing} bytes short", short=True)
            if skip:
                skip -= len(piece)
                continue
            fill.land(piece)

    async def aclose(self) -> None:
        async with self._lock:
            self._closed = True
            session, self._session = self._session, None
        if self._threads is not None:
            await self._threads.aclose()
        if session is not None:
            await session.close()
