"""Triton's generate extension over the real engine and a real causal LM, on raw HTTP:
``generate`` and ``generate_stream`` in Triton's shapes, text equal to transformers' greedy
decoding, and errors as ``{"error": "message"}``."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.fixtures.lm import LM, Oracle, lm_dir, lm_server, oracle  # noqa: F401
from tests.fixtures.server import LiveServer

PROMPT = "The quick brown fox jumps over the lazy dog because"
N = 16


def events(raw: bytes) -> list[dict[str, object]]:
    """Triton's stream: ``data: <json>`` events, no ``[DONE]``."""
    parts = raw.decode().split("\n\n")
    assert parts[-1] == "", raw[-200:]
    out = []
    for p in parts[:-1]:
        assert p.startswith("data: "), p
        out.append(json.loads(p[len("data: "):]))
    return out


@pytest.mark.parametrize("path", [f"/v2/models/{LM}/generate", f"/v2/models/{LM}/versions/1/generate"])
async def test_generate_is_transformers_greedy(lm_server: LiveServer, oracle: Oracle, path: str) -> None:
    want = oracle.greedy(oracle.encode(PROMPT), N)
    body = {"text_input": PROMPT, "parameters": {"max_tokens": N, "temperature": 0, "stream": False}}
    async with aiohttp.ClientSession(lm_server.http_url) as s, s.post(path, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        doc = await r.json()
    assert set(doc) == {"model_name", "model_version", "text_output"}
    assert (doc["model_name"], doc["model_version"]) == (LM, "1")
    oracle.check_text(doc["text_output"], want)


async def test_generate_stream_joins_to_generate(lm_server: LiveServer) -> None:
    body = {"text_input": PROMPT, "max_tokens": N, "temperature": 0}  # top-level fields are parameters too
    async with aiohttp.ClientSession(lm_server.http_url) as s:
        async with s.post(f"/v2/models/{LM}/generate", json=body) as r:
            whole = (await r.json())["text_output"]
        async with s.post(f"/v2/models/{LM}/generate_stream", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            evs = events(await r.read())
    assert evs and all(set(e) == {"model_name", "model_version", "text_output"} for e in evs)
    assert "".join(str(e["text_output"]) for e in evs) == whole


async def test_exclude_input_in_output_false_repeats_the_prompt(lm_server: LiveServer) -> None:
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 4, "temperature": 0}}
    async with aiohttp.ClientSession(lm_server.http_url) as s:
        async with s.post(f"/v2/models/{LM}/generate", json=body) as r:
            text = (await r.json())["text_output"]
        body["parameters"]["exclude_input_in_output"] = False  # type: ignore[index]
        async with s.post(f"/v2/models/{LM}/generate", json=body) as r:
            assert (await r.json())["text_output"] == PROMPT + text


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v2/models/nope/generate", {"text_input": "x"}, 404),
    (f"/v2/models/{LM}/versions/2/generate", {"text_input": "x"}, 404),
    (f"/v2/models/{LM}/generate", {"text_input": 3}, 400),
    (f"/v2/models/{LM}/generate", {"text_input": "x", "parameters": {"temperature": "hot"}}, 400),
    (f"/v2/models/{LM}/generate", {"text_input": "x", "parameters": {"max_tokens": 10**6}}, 400),
    (f"/v2/models/{LM}/generate_stream", {"text_input": "x " * 400}, 400),
    (f"/v2/models/{LM}/generate_stream", [1, 2], 400),
])
async def test_errors_in_triton_shape(lm_server: LiveServer, path: str, body: object, status: int) -> None:
    async with aiohttp.ClientSession(lm_server.http_url) as s, s.post(path, json=body) as r:
        doc = await r.json()
        assert r.status == status, doc
        assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"]


async def test_an_error_after_the_stream_began_is_an_event(lm_server: LiveServer) -> None:
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 220, "ignore_eos": True, "temperature": 0}}
    async with aiohttp.ClientSession(lm_server.http_url) as s:
        async with s.post(f"/v2/models/{LM}/generate_stream", json=body) as r:
            assert r.status == 200
            raw = b""
            async for chunk in r.content.iter_any():
                raw += chunk
                if raw.count(b"\n\n") == 2:
                    async with s.post(f"/v2/repository/models/{LM}/unload") as u:
                        assert u.status == 200
    evs = events(raw)
    assert set(evs[-1]) == {"error"} and "unload" in str(evs[-1]["error"])
    assert len(evs) < 220
