"""Ray's HTTP proxy seen from a test: plain requests, a server-sent-event stream read event by
event, and a replica's metrics (``tests/deploy/test_ray_serve.py``)."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import orjson


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proxy:
    """Ray's HTTP proxy on the head node."""

    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, body: object = None,
             timeout: float = 120) -> tuple[int, dict[str, str], object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = orjson.dumps(body) if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            r = conn.getresponse()
            raw = r.read()
            try:
                doc = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:  # Ray's proxy's own answers are text
                doc = raw
            return r.status, {k.lower(): v for k, v in r.getheaders()}, doc
        finally:
            conn.close()

    def metrics(self, app: str, model: str) -> dict[str, float]:
        """The Prometheus samples of the replica that holds ``model`` (``/metrics?model=``), by
        series (``name{labels}``)."""
        status, _, doc = self.call("GET", f"/{app}/metrics?model={model}")
        assert status == 200 and isinstance(doc, bytes), (status, doc)
        samples = {}
        for line in doc.decode().splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                samples[series] = float(value)
        return samples


def sse(proxy: Proxy, path: str, body: object, timeout: float = 120,
        started: threading.Event | None = None) -> tuple[int, dict[str, str], list[tuple[float, bytes]], str]:
    """A streamed POST read event by event: (status, headers, [(arrival, data)], "" or the client's
    error). ``started`` is set at the first event."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    events: list[tuple[float, bytes]] = []
    try:
        conn.request("POST", path, body=orjson.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        headers = {k.lower(): v for k, v in r.getheaders()}
        if not headers.get("content-type", "").startswith("text/event-stream"):
            return r.status, headers, [(time.monotonic(), r.read())], ""
        try:
            for line in r:
                if line.startswith(b"data: "):
                    events.append((time.monotonic(), line.strip()[len(b"data: "):]))
                    if started is not None:
                        started.set()
        except (http.client.HTTPException, OSError) as e:  # cut by the proxy: an error, not a hang
            return r.status, headers, events, f"{type(e).__name__}: {e}"
        return r.status, headers, events, ""
    finally:
        conn.close()


def hang_up(proxy: Proxy, path: str, body: object, after: int, timeout: float = 60) -> tuple[int, list[bytes]]:
    """A streamed POST whose client leaves after ``after`` events: the socket is shut down both
    ways (a FIN to Ray's proxy at once, whatever still refers to it). (status, events read)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    events: list[bytes] = []
    try:
        conn.request("POST", path, body=orjson.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        for line in r:
            if line.startswith(b"data: "):
                events.append(line.strip()[len(b"data: "):])
                if len(events) >= after:
                    break
        assert conn.sock is not None
        conn.sock.shutdown(socket.SHUT_RDWR)
        return r.status, events
    finally:
        conn.close()
