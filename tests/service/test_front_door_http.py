"""The HTTP front door of a real server process, byte for byte (review F4, F5, F6, F7).

Parser refusals answer fixed JSON with Connection: close and never echo the request (a bearer
token on a malformed header line included), and log one line without it; zstd is 415 like any
other encoding; a refusal that leaves the body unread says Connection: close, so a pooled
client's next request goes through.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from loadtest.soak import ServerProcess
from tests.service.rawhttp import exchange, infer_body, parse, recv_all, request, serve

TOKEN = "inf-token-front-door-123"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
INFER = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cfg = f"""
[server]
shutdown_timeout_s = 2
[server.auth]
inference_tokens = ["{TOKEN}"]
[models.mlp]
uri = "{model_dirs['tiny-mlp']}"
"""
    with serve(cfg, tmp_path_factory.mktemp("http")) as s:
        yield s


# (label, raw request): each is refused by aiohttp's parser before the app runs.
PARSER_CASES = [
    ("lowercase method", b"post /v2 HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("unknown method", b"FOO /v2 HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("token line with NUL", b"GET /v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\x00\r\n\r\n"),
    ("token line with a control byte", b"GET /v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
     + b"\x01x\r\n\r\n"),
    ("Content-Length 2^70", b"GET /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(2**70).encode() + b"\r\n\r\n"),
    ("request line over 8190 bytes", b"GET /v2/models/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("non-ASCII path", "GET /v2/models/é HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
    ("obs-fold", b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
    ("LF-only line ends", b"GET /v2 HTTP/1.1\nHost: x\n\n"),
    ("bad chunk size", INFER + AUTH + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"),
    ("CL and TE together", INFER + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
    ("5000 headers", b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: a\r\n" % i for i in range(5000)) + b"\r\n"),
]


@pytest.mark.parametrize("label, raw", PARSER_CASES, ids=[c[0] for c in PARSER_CASES])
def test_parser_errors_are_json_and_echo_nothing(server: ServerProcess, label: str, raw: bytes) -> None:
    resp = exchange(server.port, raw, timeout=5)
    status, headers, body = parse(resp)
    assert 400 <= status < 500, resp[:300]
    assert headers["content-type"] == "application/json", resp[:300]
    assert headers.get("connection", "").lower() == "close", resp[:300]
    assert set(orjson.loads(body)) == {"error"}
    assert TOKEN.encode() not in resp and b"Authorization" not in resp and b"aaaa" not in resp, resp[:300]


def test_tokens_and_tracebacks_stay_out_of_the_log(server: ServerProcess) -> None:
    for _, raw in PARSER_CASES:
        exchange(server.port, raw, timeout=5)
    log = server.log()
    assert TOKEN not in log
    assert "Traceback" not in log
    # One short line per refusal, not a ~2 KB traceback each.
    refusals = [line for line in log.splitlines() if '"bad_http"' in line]
    assert refusals and max(map(len, refusals)) < 400


def test_expect_other_than_100_continue_is_json_417(server: ServerProcess) -> None:
    status, headers, body = parse(exchange(server.port, b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + AUTH
                                           + b"Expect: 200-ok\r\nConnection: close\r\n\r\n"))
    assert status == 417 and headers["content-type"] == "application/json"
    assert "error" in orjson.loads(body)


@pytest.mark.parametrize("encoding", ["zstd", "gzip", "br", "x-custom"])
def test_content_encodings_are_415_with_a_hint(server: ServerProcess, encoding: str) -> None:
    status, headers, body = request(server.port, "POST", "/v2/models/mlp/infer", b"{}",
                                    {"Authorization": f"Bearer {TOKEN}", "Content-Encoding": encoding})
    assert status == 415, body
    assert headers["content-type"] == "application/json"
    assert headers["accept-encoding"] == "identity"
    assert b"backports" not in body and b"install" not in body


def test_415_with_unread_body_says_connection_close(server: ServerProcess) -> None:
    # Headers alone first: the body is not sent yet, so the 415 leaves it unread.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(INFER + AUTH + b"Content-Encoding: gzip\r\nContent-Length: 100000\r\n\r\n")
        status, headers, _ = parse(recv_all(s, 3))
    assert status == 415 and headers.get("connection", "").lower() == "close"


def test_pooled_connection_survives_a_415(server: ServerProcess) -> None:
    body = infer_body([1, 2, 3])
    url = f"{server.url}/v2/models/mlp/infer"
    hdrs = {"Authorization": f"Bearer {TOKEN}"}

    async def go() -> list[int]:
        statuses = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            for extra in ({"Content-Encoding": "gzip"}, {}, {"Content-Encoding": "zstd"}, {}):
                async with s.post(url, data=body, headers={**hdrs, **extra}) as r:
                    await r.read()
                    statuses.append(r.status)
        return statuses

    assert asyncio.run(go()) == [415, 200, 415, 200]


@pytest.mark.parametrize("value", ["+16", " 16x", "1_6", "\u0661\u0666", "-5"])
def test_header_length_is_ascii_digits_only(server: ServerProcess, value: str) -> None:
    body = orjson.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 1],
                                     "parameters": {"binary_data_size": 8}}]})
    raw = (INFER + AUTH + f"Inference-Header-Content-Length: {value}\r\n".encode()
           + f"Content-Length: {len(body) + 8}\r\nConnection: close\r\n\r\n".encode() + body + bytes(8))
    status, headers, out = parse(exchange(server.port, raw))
    assert status == 400 and headers["content-type"] == "application/json", out
