"""Raw-socket HTTP for front-door tests: the exact bytes a server sends, which clients hide.

Also ``serve``: a real ``python -m cicada_async serve`` process for a TOML config.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from loadtest.soak import ServerProcess


@contextmanager
def serve(config_toml: str, workdir: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(config_toml, workdir, env=env).start()
    try:
        yield server
    finally:
        server.stop()


def recv_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the peer closes, or ``timeout`` of silence."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return recv_all(s, timeout)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the first response in ``raw``."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", len(rest)))
    return status, headers, rest[:n]


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection, ``Connection: close``."""
    hdrs = {"Host": "127.0.0.1", "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    raw = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in hdrs.items()) + b"\r\n" + body
    return parse(exchange(port, raw, timeout))


def infer_body(data: list[object], datatype: str = "INT64", shape: list[int] | None = None,
               name: str = "input_ids", **extra: object) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "datatype": datatype,
                                     "shape": shape or [1, len(data)], "data": data}], **extra})


def wait_for(pred: object, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(step)
    return False
