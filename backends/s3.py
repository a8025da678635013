"""S3 backend on aiobotocore: concurrent ranged GETs streamed straight into caller buffers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

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
from backends._s3urls import URL_EXPIRES_S, UrlCache, UrlExpired, expired, proxied
from backends._threadfetch import ThreadFetch
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
# The largest slice one body.read() hands back; it bounds the transient bytes object that is
# copied once into the caller's buffer.
_READ_PIECE = 1 * MiB

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_CHANGED = {"PreconditionFailed", "412"}
_XML_FIELD = re.compile(r"<(Code|Message)>([^<]*)</")

_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def shared_loader() -> Any:
    """botocore's data loader with the S3 service model loaded, one per process (blocking).

    Loading botocore's JSON data (the service model, endpoint rules, retry config) is about
    0.2 s of GIL-bound parsing per session. Each backend's own session paid it again for every
    model, and twice in a first request (the startup describe and the load each open a
    backend: 0.5-1 s together on 2 cores). Sessions stay per backend (credentials are cached
    per session); only this read-only data is shared.
    """
    global _LOADER
    with _LOADER_LOCK:
        if _LOADER is None:
            from aiobotocore.session import get_session

            loader = get_session().get_component("data_loader")
            # What creating an S3 client reads (its paginators and waiters load on use), called
            # as botocore calls it: the loader caches by the exact arguments.
            for path in ("_retry", "endpoints", "sdk-default-configuration"):
                loader.load_data_with_path(path)
            loader.load_data("partitions")
            for kind in ("service-2", "endpoint-rule-set-1"):
                loader.load_service_model("s3", kind, api_version=None)
            _LOADER = loader
        return _LOADER


def _error(status: int, code: str, message: str, what: str) -> StorageError:
    if code in _NOT_FOUND or status == 404:
        return ObjectNotFound(f"{what}: not found ({code or status})")
    if code in _CHANGED or status == 412:
        return ObjectChanged(f"{what}: the object was replaced (ETag no longer matches)")
    if code == "InvalidRange" or status == 416:
        return IntegrityError(f"{what}: the object is shorter than the range asked")
    return StorageError(f"{what}: S3 error {code or status}: {message}")


@contextlib.contextmanager
def map_exceptions(what: str) -> Iterator[None]:
    """Turn botocore/aiohttp failures of a request (not of its body) into our errors."""
    try:
        yield
    except ClientError as e:
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        raise _error(int(status), str(err.get("Code", "")), err.get("Message", ""), what) from e
    except (ReadTimeoutError, ConnectTimeoutError, TimeoutError) as e:
        raise StorageTimeout(f"{what}: timed out ({type(e).__name__})") from e
    except (BotoCoreError, aiohttp.ClientError, OSError) as e:
        raise StorageError(f"{what}: {type(e).__name__}: {e}") from e


class S3Backend:
    """Objects under ``s3://bucket/prefix``; keys are paths relative to the prefix.

    Settings beyond the shared ones (see ``backends._remote.RemoteSettings``): endpoint_url,
    region, aws_access_key_id, aws_secret_access_key, aws_session_token, retry_mode,
    addressing_style, op_timeout_s.
    """

    alignment = 1

    def __init__(
        self,
        bucket: str,
        prefix: str,
        settings: RemoteSettings,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        credentials: dict[str, str] | None = None,
        retry_mode: str = "standard",
        addressing_style: str = "auto",
        op_timeout_s: float | None = None,
    ) -> None:
        if retry_mode not in ("standard", "adaptive"):
            raise ConfigError(f"retry_mode must be 'standard' or 'adaptive', not {retry_mode!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings
        self.endpoint_url = endpoint_url
        self.region = region
        self._credentials = credentials or {}
        self.retry_mode = retry_mode
        self.addressing_style = addressing_style
        # One request with all of botocore's retries must finish within this; it is the outer
        # bound, botocore's own connect/read timeouts fire first in any normal failure.
        s = settings
        self.op_timeout_s = op_timeout_s or (
            s.max_attempts * (s.connect_timeout_s + s.read_timeout_s + 20.0)
        )
        self._sem = asyncio.Semaphore(s.concurrency)
        self._lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._closed = False
        # Bodies land from worker threads on presigned URLs (backends._threadfetch); HEAD,
        # signing and credentials stay with aiobotocore.
        self._threads: ThreadFetch | None = None
        if s.data_path == "threads":
            from botocore.httpsession import get_cert_path

            cafile = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
            self._threads = ThreadFetch(s, name="cicada-s3", cafile=cafile or None)
        self._urls = UrlCache()

    @classmethod
    def from_uri(cls, uri: str, settings: dict[str, Any]) -> "S3Backend":
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(f"expected s3://bucket/prefix, got {uri!r}")
        rest = dict(settings)
        shared = RemoteSettings.take(rest, concurrency=16, chunk_bytes=32 * MiB)  # docs/storage.md
        creds: dict[str, str] = {
            k: str(rest.pop(k))
            for k in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
            if k in rest
        }
        if bool(creds.get("aws_access_key_id")) != bool(creds.get("aws_secret_access_key")):
            raise ConfigError("give both aws_access_key_id and aws_secret_access_key, or neither")
        op_timeout = rest.pop("op_timeout_s", None)
        backend = cls(
            parts.netloc,
            parts.path,
            shared,
            endpoint_url=rest.pop("endpoint_url", None),
            region=rest.pop("region", None),
            credentials=creds,
            retry_mode=str(rest.pop("retry_mode", "standard")),
            addressing_style=str(rest.pop("addressing_style", "auto")),
            op_timeout_s=float(op_timeout) if op_timeout is not None else None,
        )
        reject_unknown(rest, "s3")
        return backend

    def _object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    async def _get_client(self) -> Any:
        # Created lazily so that the aiohttp session inside belongs to the running loop.
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._closed:
                raise StorageError("the S3 backend is closed")
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                session = get_session()
                session.register_component("data_loader", await asyncio.to_thread(shared_loader))
                if self._threads is not None:
                    # The threads trust what the client does: botocore's resolved ca_bundle
                    # (AWS_CA_BUNDLE or the profile's key), else certifi's, as before.
                    self._threads.pool.trust(session.get_config_variable("ca_bundle") or self._threads.pool.cafile)
                s = self.settings
                config = AioConfig(
                    connect_timeout=s.connect_timeout_s,
                    read_timeout=s.read_timeout_s,
                    # Explicit, because botocore's default retry mode is due to change.
                    retries={"mode": self.retry_mode, "total_max_attempts": s.max_attempts},
                    max_pool_connections=max(10, s.concurrency + 2),
                    s3={"addressing_style": self.addressing_style},
                    # Presigned GETs carry the data path: SigV4, which every region accepts
                    # (botocore would presign with SigV2 by default).
                    signature_version="s3v4",
                    # Ranged GETs carry no full-object checksum, so botocore must not try to
                    # validate one (and must not wrap the body, which would add a copy).
                    response_checksum_validation="when_required",
                    request_checksum_calculation="when_required",
                    # shared_loader() loaded the service model, in a thread.
                    warm_up_loader_caches=False,
                )
                stack = contextlib.AsyncExitStack()
                with map_exceptions(f"creating an S3 client for s3://{self.bucket}"):
                    async with asyncio.timeout(self.op_timeout_s):
                        self._client = await stack.enter_async_context(
                            session.create_client(
                                "s3",
                                region_name=self.region,
                                endpoint_url=self.endpoint_url,
                                config=config,
                                **self._credentials,
                            )
                        )
                self._stack = stack
        return self._client

    async def stat(self, key: str) -> ObjectInfo:
        what = f"HEAD {self._where(key)}"
        client = await self._get_client()
        with map_exceptions(what):
            async with asyncio.timeout(self.op_timeout_s):
                resp = await client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        return ObjectInfo(key=key, size=int(resp["ContentLength"]), version=resp.get("ETag"))

    async def read_into(
        self, key: str, offset: int, buf: memoryview, *, version: str | None = None
    ) -> None:
        obj = self._object_key(key)
        if offset < 0:
            raise StorageError(f"negative offset {offset} for {self._where(key)}")
        if not len(buf):
            return
        client = await self._get_client()
        url = await self._presigned(client, obj, key) if self._threads is not None else None

        async def read_chunk(fill: Fill) -> None:
            what = f"GET {self._where(key)} bytes {fill.offset}-{fill.offset + len(fill.view) - 1}"
            if url is None:
                once = lambda f: self._read_once(client, obj, f, version, what)  # noqa: E731
                await fill_resuming(fill, once, self.settings, what)
                return
            signed = url
            for last_try in (False, True):
                try:
                    threaded = lambda f: self._read_threaded(signed, f, version, what)  # noqa: E731
                    await fill_resuming(fill, threaded, self.settings, what)
                    return
                except UrlExpired:
                    if last_try:
                        raise
                # Signed again (resuming from the bytes landed), now that botocore had the
                # chance to refresh the credentials; a second refusal is final.
                fresh = await self._presigned(client, obj, key, stale=signed)
                if fresh is None:
                    raise StorageError(f"{what}: presigned URL expired and none could be made")
                signed = fresh

        await gather_chunks(buf.cast("B"), offset, self.settings, self._sem, read_chunk)

    async def _presigned(self, client: Any, obj: str, key: str, *, stale: str | None = None) -> str | None:
        """A presigned GET URL for ``obj`` (Range and If-Match go unsigned as headers), or
        None when a proxy from the environment applies and the data must go via botocore.
        ``stale``: a URL the origin refused as expired, never handed out again."""
        cached = self._urls.get(obj, stale)
        if cached is not None:
            return cached
        with map_exceptions(f"presigning GET {self._where(key)}"):
            async with asyncio.timeout(self.op_timeout_s):
                url = await client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": obj}, ExpiresIn=URL_EXPIRES_S
                )
        if not isinstance(url, str) or proxied(url):  # aiobotocore is untyped: its answer is checked
            return None
        self._urls.put(obj, url)
        return url

    async def _read_threaded(self, url: str, fill: Fill, version: str | None, what: str) -> None:
        first, last = fill.pos, fill.offset + len(fill.view) - 1
        headers = {"Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"}
        if version is not None:
            headers["If-Match"] = version

        def check(resp: Response) -> int:  # in the worker thread, before the body
            if resp.status not in (200, 206):
                fields = dict(_XML_FIELD.findall(resp.read_small().decode("utf-8", "replace")))
                code, message = fields.get("Code", ""), fields.get("Message", "")
                if expired(resp.status, code, message):
                    raise UrlExpired(f"{what}: S3 error {code}: {message}")
                raise _error(resp.status, code, message, what)
            self._check_response(resp.headers, first, last, version, what)
            return 0

        assert self._threads is not None
        await self._threads.get_into(url, headers, fill, check, what)

    async def _read_once(
        self, client: Any, obj: str, fill: Fill, version: str | None, what: str
    ) -> None:
        """One ranged GET for the missing tail of ``fill``; raises Transient if the body breaks."""
        first, last = fill.pos, fill.offset + len(fill.view) - 1
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": obj, "Range": f"bytes={first}-{last}"}
        if version is not None:
            args["IfMatch"] = version
        with map_exceptions(what):
            async with asyncio.timeout(self.op_timeout_s):
                resp = await client.get_object(**args)
        body = resp["Body"]
        try:
            fields = {"ETag": resp.get("ETag"), "Content-Range": resp.get("ContentRange"),
                      "Content-Length": resp.get("ContentLength")}
            self._check_response({k: str(v) for k, v in fields.items() if v is not None},
                                 first, last, version, what)
            await self._stream_body(body, fill, what)
        finally:
            # Closing an unfinished body drops its connection rather than reusing a dirty one.
            body.close()

    @staticmethod
    def _check_response(
        headers: Mapping[str, str], first: int, last: int, version: str | None, what: str
    ) -> None:
        """The answer's HTTP headers (ETag, Content-Range, Content-Length) against the ask."""
        if version is not None and headers.get("ETag") not in (None, version):
            # Servers that ignore If-Match (s3rver, some gateways) still tell us the ETag.
            raise ObjectChanged(f"{what}: ETag {headers.get('ETag')} is no longer {version}")
        m = _CONTENT_RANGE.fullmatch(str(headers.get("Content-Range") or ""))
        if m is None:
            raise IntegrityError(
                f"{what}: no usable Content-Range in the answer ({headers.get('Content-Range')!r}); "
                "the server or a proxy ignored the Range header"
            )
        got_first, got_last = int(m[1]), int(m[2])
        if got_first != first:
            raise IntegrityError(f"{what}: server answered bytes {got_first}-{got_last}")
        if got_last != last:
            raise IntegrityError(
                f"{what}: object is shorter than expected (answer ends at byte {got_last}, "
                f"total {m[3]})"
            )
        length = headers.get("Content-Length")
        if length is not None and int(length) > last - first + 1:
            raise IntegrityError(f"{what}: Content-Length {length} exceeds the range asked")

    async def _stream_body(self, body: Any, fill: Fill, what: str) -> None:
        timeout = self.settings.read_timeout_s
        while fill.missing:
            try:
                async with asyncio.timeout(timeout):
                    piece = await body.read(min(fill.missing, _READ_PIECE))
            except (TimeoutError, ReadTimeoutError) as e:
                raise Transient(f"no body bytes for {timeout}s", timeout=True) from e
            except (ResponseStreamingError, IncompleteReadError, aiohttp.ClientError) as e:
                raise Transient(f"body broke off: {type(e).__name__}: {e}") from e
            if not piece:
                # A clean end before the range was complete: never let a short body pass.
                raise Transient(f"body ended {fill.missing} bytes short", short=True)
            fill.land(piece)

    async def aclose(self) -> None:
        async with self._lock:
            self._closed = True
            stack, self._stack, self._client = self._stack, None, None
        if self._threads is not None:
            await self._threads.aclose()
        if stack is not None:
            await stack.aclose()
