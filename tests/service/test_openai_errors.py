"""The OpenAI routes' refusals over the real engine and a real causal LM: every error's status
and OpenAI's shape (validation, context, unknown model, body size, auth, overload, drain), through
raw HTTP and the official ``openai`` client's typed exceptions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.lm import LM, lm_config, lm_dir, lm_server, openai_error  # noqa: F401
from tests.fixtures.server import LiveServer, live_server

openai = pytest.importorskip("openai")

PROMPT = "The quick brown fox jumps over the lazy dog because"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]


def client(server: LiveServer) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


ERRORS = [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, None),
    ("/v1/completions", {"model": LM, "prompt": "x " * 400}, 400, "prompt"),
    ("/v1/completions", {"model": LM, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": LM, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": LM, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": LM, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": LM, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": LM, "prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": LM, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": LM, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": LM, "messages": MESSAGES, "top_logprobs": 9, "logprobs": True}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"model": LM, "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/openai/v1/chat/completions", {"model": LM, "messages": "hi"}, 400, "messages"),
    ("/v1/completions", {"model": LM, "prompt": "x", "priority": -1}, 400, "priority"),
    ("/v1/completions", {"model": LM, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERRORS)
async def test_errors_in_openai_shape(lm_server: LiveServer, path: str, body: dict[str, object], status: int,
                                      param: str | None) -> None:
    async with aiohttp.ClientSession(lm_server.http_url) as s, s.post(path, json=body) as r:
        err = openai_error(await r.read())
        assert r.status == status, err
        assert err["param"] == param
        assert err["type"] == "invalid_request_error"
        if status == 404:
            assert err["code"] == "model_not_found"


async def test_oversized_and_malformed_bodies(lm_server: LiveServer) -> None:
    async with aiohttp.ClientSession(lm_server.http_url) as s:
        async with s.post("/v1/completions", data=b"{" + b" " * (2 << 20) + b"}") as r:
            assert r.status == 413 and openai_error(await r.read())
        async with s.post("/v1/completions", data=b"{not json") as r:
            assert r.status == 400 and openai_error(await r.read())
        async with s.get("/v1/nowhere") as r:
            assert r.status == 404 and openai_error(await r.read())


def test_client_raises_typed_errors(lm_server: LiveServer) -> None:
    c = client(lm_server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=LM, messages=[{"role": "wizard", "content": "x"}])  # type: ignore[misc,list-item]
    assert e.value.body["param"] == "messages[0].role"  # type: ignore[index]


def test_auth_401_and_403_in_openai_shape(lm_dir: Path) -> None:
    cfg = lm_config(lm_dir)
    cfg.server.auth.inference_tokens = ["inf-token"]
    cfg.server.auth.admin_tokens = ["adm-token"]
    with live_server(cfg) as s:
        with pytest.raises(openai.AuthenticationError) as e401:
            client(s).models.list()
        assert e401.value.status_code == 401 and e401.value.body["type"] == "authentication_error"  # type: ignore[index]
        admin = openai.OpenAI(base_url=s.http_url + "/v1", api_key="adm-token", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as e403:
            admin.models.list()
        assert e403.value.status_code == 403
        ok = openai.OpenAI(base_url=s.http_url + "/v1", api_key="inf-token", max_retries=0)
        assert [m.id for m in ok.models.list()] == [LM]


async def test_overload_and_drain_are_503_with_retry_after(lm_dir: Path) -> None:
    # The body budget shared with V2 infer: a body that does not fit is refused before it is read.
    with live_server(lm_config(lm_dir, max_body_bytes_in_flight=16)) as s:
        async with aiohttp.ClientSession(s.http_url) as session:
            async with session.post("/v1/completions", json={"model": LM, "prompt": PROMPT}) as r:
                assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
                assert openai_error(await r.read())["type"] == "server_error"
            s.sync(s.plane.begin_drain)
            async with session.post("/v1/chat/completions", json={"model": LM, "messages": MESSAGES}) as r:
                assert r.status == 503 and r.headers["Retry-After"]
                openai_error(await r.read())


async def test_a_full_waiting_line_is_503_with_retry_after(lm_dir: Path) -> None:
    """One sequence at a time (max_sequences = 1) and its engine's waiting line full: refused."""
    with live_server(lm_config(lm_dir, model={"max_sequences": 1})) as s:
        body = {"model": LM, "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
        async with aiohttp.ClientSession(s.http_url) as session:
            async def one() -> tuple[int, str | None, bytes]:
                async with session.post("/v1/completions", json=body) as r:
                    return r.status, r.headers.get("Retry-After"), await r.read()

            answers = await asyncio.gather(*(one() for _ in range(8)))
    refused = [(h, raw) for status, h, raw in answers if status == 503]
    assert refused and all(status in (200, 503) for status, _, _ in answers), [a[:2] for a in answers]
    assert all(h is not None and int(h) >= 1 and openai_error(raw)["type"] == "server_error" for h, raw in refused)
    assert sum(status == 200 for status, _, _ in answers) >= 2


async def test_the_drain_deadline_ends_a_stream_with_an_error_event(lm_dir: Path) -> None:
    from cicada_async.service.lifecycle import _answer_or_abort

    with live_server(lm_config(lm_dir)) as s:
        body = {"model": LM, "prompt": PROMPT, "max_tokens": 220, "stream": True, "ignore_eos": True}
        async with aiohttp.ClientSession(s.http_url) as session, session.post("/v1/completions", json=body) as r:
            events: list[bytes] = []
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line.strip()[len(b"data: "):])
                    if len(events) == 2:  # the drain's deadline passes: handlers in flight are cancelled
                        s.plane.begin_drain()
                        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                            _answer_or_abort(s.app, 0.0), s.loop))
    assert events[-1] == b"[DONE]"
    err = openai_error(events[-2])
    assert "shut down" in str(err["message"]) and len(events) < 220
