"""Hostile requests: every malformed body, header or name is a 4xx naming the problem.

Runs over the fake engine (deterministic, fast). After the whole matrix the server must still
answer a good request exactly: zero wrong answers, zero hung requests.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import torch

from protocols import v2
from tests.fixtures.server import FakeEngine, LiveServer, fake_config, live_server

LIMIT = 64 * 1024


@pytest.fixture
def server() -> Iterator[LiveServer]:
    engine = FakeEngine()
    cfg = fake_config(max_request_bytes=LIMIT, body_timeout_s=0.5)
    with live_server(cfg, engine_factory=lambda c: engine) as s:
        yield s


def _x(shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": shape, **extra}


def _binary(inputs: list[dict[str, Any]], blob: bytes) -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": inputs})
    return header + blob, {v2.HEADER_LENGTH: str(len(header))}


def _cases() -> list[tuple[str, bytes, dict[str, str], int, str]]:
    four = np.ones((1, 4), np.float32).tobytes()
    good_binary, good_hl = _binary([_x([1, 4], parameters={"binary_data_size": 16})], four)
    deep = b"[" * 5000 + b"]" * 5000
    return [
        # (label, body, headers, status, message fragment)
        ("not JSON", b"{nope", {}, 400, "not valid JSON"),
        ("JSON array", b"[1,2]", {}, 400, "JSON object"),
        ("no inputs", b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
        ("header length larger than body", good_binary, {v2.HEADER_LENGTH: str(len(good_binary) + 1)}, 400,
         "does not fit"),
        ("header length negative", good_binary, {v2.HEADER_LENGTH: "-5"}, 400, "must be an integer"),
        ("header length zero", good_binary, {v2.HEADER_LENGTH: "0"}, 400, "does not fit"),
        ("header length not a number", good_binary, {v2.HEADER_LENGTH: "12abc"}, 400, "must be an integer"),
        ("header length huge", good_binary, {v2.HEADER_LENGTH: str(2**80)}, 400, "does not fit"),
        ("binary_data_size smaller than shape", *_binary([_x([1, 4], parameters={"binary_data_size": 8})], four[:8]),
         400, "binary_data_size 8"),
        ("binary_data_size past the body", *_binary([_x([1, 4], parameters={"binary_data_size": 16})], four[:8]),
         400, "runs past the end"),
        ("binary bytes not claimed", *_binary([_x([1, 4], parameters={"binary_data_size": 16})], four + b"xx"),
         400, "not claimed"),
        ("binary_data_size negative", *_binary([_x([1, 4], parameters={"binary_data_size": -16})], four),
         400, "non-negative"),
        ("binary_data_size and data", *_binary([_x([1, 4], data=[1, 2, 3, 4], parameters={"binary_data_size": 16})],
                                               four), 400, "both"),
        ("huge shape, binary", *_binary([_x([2**40, 2**40], parameters={"binary_data_size": 16})], four),
         400, "needs"),
        ("element count differs from shape", orjson.dumps({"inputs": [_x([2, 4], data=[1.0] * 4)]}), {}, 400,
         "elements in data"),
        ("huge shape, JSON", orjson.dumps({"inputs": [_x([2**62, 2**62], data=[1.0])]}), {}, 400, "elements"),
        ("ragged JSON", orjson.dumps({"inputs": [_x([2, 2], data=[[1.0, 2.0], [3.0]])]}), {}, 400, "does not fit"),
        ("deeply nested JSON", b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + deep + b"}]}",
         {}, 400, "JSON"),
        ("negative dimension", orjson.dumps({"inputs": [_x([-1, 4], data=[1.0] * 4)]}), {}, 400, "non-negative"),
        ("33 dimensions", orjson.dumps({"inputs": [_x([1] * 33, data=[1.0])]}), {}, 400, "at most 32"),
        ("unsupported datatype BYTES", orjson.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1],
                                                                 "data": ["a"]}]}), {}, 400, "unsupported datatype"),
        ("unknown datatype", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]}),
         {}, 400, "unsupported datatype"),
        ("FP16 as JSON", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP16", "shape": [1, 4],
                                                   "data": [1, 2, 3, 4]}]}), {}, 400, "no JSON form"),
        ("datatype the model does not take", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP64",
                                                                       "shape": [1, 4], "data": [1.0] * 4}]}),
         {}, 400, "must be FP32"),
        ("rank the model does not take", orjson.dumps({"inputs": [_x([4], data=[1.0] * 4)]}), {}, 400,
         "model expects"),
        ("value out of range", orjson.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1],
                                                         "data": [1000]}]}), {}, 400, "does not fit INT8"),
        ("input twice", orjson.dumps({"inputs": [_x([1, 4], data=[1.0] * 4)] * 2}), {}, 400, "appears twice"),
        ("priority not an integer", orjson.dumps({"inputs": [_x([1, 4], data=[1.0] * 4)],
                                                  "parameters": {"priority": "high"}}), {}, 400, "priority"),
        ("negative timeout", orjson.dumps({"inputs": [_x([1, 4], data=[1.0] * 4)],
                                           "parameters": {"timeout": -1}}), {}, 400, "timeout"),
        ("gzip body", gzip.compress(orjson.dumps({"inputs": [_x([1, 4], data=[1.0] * 4)]})),
         {"Content-Encoding": "gzip"}, 415, "Content-Encoding 'gzip'"),
        ("deflate bomb", zlib.compress(b"\0" * (4 << 20)), {"Content-Encoding": "deflate"}, 415, "uncompressed"),
        ("br body", b"\x0b\x02\x80{}\x03", {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        ("body over the limit", b" " * (LIMIT + 1), {}, 413, f"exceeds {LIMIT} bytes"),
    ]


CASES = _cases()


@pytest.mark.parametrize("label,body,headers,status,needle", CASES, ids=[c[0] for c in CASES])
async def test_hostile_request_is_refused_with_its_reason(server: LiveServer, label: str, body: bytes,
                                                          headers: dict[str, str], status: int, needle: str) -> None:
    async with aiohttp.ClientSession(server.http_url, auto_decompress=False) as s:
        async with s.post("/v2/models/alpha/infer", data=body, headers=headers,
                          timeout=aiohttp.ClientTimeout(total=10)) as r:
            assert r.status == status, await r.text()
            assert r.headers["Content-Type"] == "application/json"
            msg = (await r.json())["error"]
            assert needle in msg, msg
            if status == 415:
                assert r.headers["Accept-Encoding"] == "identity"
    # The same server still answers a good request exactly.
    await _assert_good_answer(server)


async def _assert_good_answer(server: LiveServer) -> None:
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    body, hl = v2.encode_request({"x": x}, binary=True)
    async with aiohttp.ClientSession(server.http_url) as s:
        async with s.post("/v2/models/alpha/infer", data=body, headers={v2.HEADER_LENGTH: str(hl)}) as r:
            assert r.status == 200, await r.text()
            raw = await r.read()
            out = v2.decode_response(raw, int(r.headers[v2.HEADER_LENGTH]) if v2.HEADER_LENGTH in r.headers else None)
    want = x @ server.repo.get("alpha").instance.weight
    assert torch.equal(out["outputs"]["y"], want)


async def test_chunked_body_over_the_limit_is_413(server: LiveServer) -> None:
    async def chunks() -> Any:
        for _ in range(LIMIT // 4096 + 2):
            yield b" " * 4096

    async with aiohttp.ClientSession(server.http_url) as s:
        async with s.post("/v2/models/alpha/infer", data=chunks()) as r:
            assert r.status == 413 and f"exceeds {LIMIT}" in (await r.json())["error"]


async def _raw(port: int, head: bytes, body: bytes = b"", read_timeout: float = 5.0) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), read_timeout)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data


async def test_expect_continue_refused_before_the_body_is_sent(server: LiveServer) -> None:
    head = (f"POST /v2/models/alpha/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT * 10}\r\n"
            "Expect: 100-continue\r\n\r\n").encode()
    status, data = await _raw(server.port, head)  # no body byte is ever sent
    assert status == 413 and b"exceeds" in data


async def test_expect_continue_accepted_then_served(server: LiveServer) -> None:
    body = orjson.dumps({"inputs": [_x([1, 4], data=[1.0] * 4)]})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write((f"POST /v2/models/alpha/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                      "Expect: 100-continue\r\n\r\n").encode())
        await writer.drain()
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100")
        writer.write(body)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_slow_body_times_out_with_408(server: LiveServer) -> None:
    head = b"POST /v2/models/alpha/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, data = await _raw(server.port, head, b'{"inputs": ', read_timeout=5)
    assert status == 408 and b"not received within" in data
    assert loop.time() - t0 < 3


HOSTILE_NAMES = ["..%2f..%2fetc%2fpasswd", "%2e%2e", "%2e%2e%2f%2e%2e", "..", ".hidden", "a" * 64, "a" * 5000,
                 "%C3%A9t%C3%A9", "%D0%BC%D0%BE%D0%B4%D0%B5%D0%BB%D1%8C", "a%00b", "a%20b", "a%2fb",
                 "%252e%252e", "-rf", "alpha%0d%0aX-Injected:1", "~root", "a:b"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_model_names(server: LiveServer, name: str) -> None:
    """Never 200 or 500, never a path: 400 (bad name) or 404 (router: no such route)."""
    body = orjson.dumps({"inputs": [_x([1, 4], data=[1.0] * 4)]})
    async with aiohttp.ClientSession(server.http_url) as s:
        for method, path in [("POST", f"/v2/models/{name}/infer"), ("GET", f"/v2/models/{name}"),
                             ("GET", f"/v2/models/{name}/ready"), ("POST", f"/v2/repository/models/{name}/load"),
                             ("POST", f"/v2/repository/models/{name}/unload"),
                             ("POST", f"/v2/models/{name}/versions/1/infer")]:
            async with s.request(method, aiohttp.client.URL(server.http_url + path, encoded=True),
                                 data=body if method == "POST" else None) as r:
                assert r.status in (400, 404), (method, path, r.status)
                assert "X-Injected" not in r.headers
                if r.status == 400:
                    assert "invalid model name" in (await r.json())["error"]
    assert set(server.repo.models) == {"alpha", "beta"}
    for inst in server.repo.engine.instances.values():
        assert inst.loads == 0  # nothing was loaded on behalf of a hostile name
