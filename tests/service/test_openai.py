"""The OpenAI routes over the real engine and a real causal LM, through the official ``openai``
client (sync, async, streamed and not) and raw HTTP: greedy text equal to transformers', the
SSE framing, usage, stop strings, logprobs shapes, an error once a stream began, a client that
hangs up mid-stream, and the metrics. The error cases are in ``test_openai_errors.py``."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.lm import LM, Oracle, lm_dir, lm_server, openai_error, oracle, scrape, wait_idle  # noqa: F401
from tests.fixtures.server import LiveServer

openai = pytest.importorskip("openai")

PROMPT = "The quick brown fox jumps over the lazy dog because"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}]
N = 24


def client(server: LiveServer, prefix: str = "/v1") -> "openai.OpenAI":
    # The client insists on a key even where none is checked; no retries: a 503 must show.
    return openai.OpenAI(base_url=server.http_url + prefix, api_key="unused", max_retries=0, timeout=120)


def aclient(server: LiveServer) -> "openai.AsyncOpenAI":
    return openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of a raw event stream, checking its framing on the way."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    events = raw.decode().split("\n\n")
    assert events[-1] == ""
    out = []
    for e in events[:-1]:
        assert e.startswith("data: ") and "\n" not in e, e
        out.append(e[len("data: "):])
    return out


def test_model_keys_reach_the_engine_options() -> None:
    from cicada_async.service.config import ModelConfig, parse_config
    from cicada_async.service.repository import model_options
    from protocols.serving import ModelOptions

    defaults = model_options(ModelConfig(name="m", uri="/m"))
    assert (defaults.kv_cache_bytes, defaults.max_sequences) == (ModelOptions().kv_cache_bytes,
                                                                 ModelOptions().max_sequences)
    cfg = parse_config({"models": {"m": {"uri": "/m", "kv_cache_bytes": 1 << 20, "max_sequences": 3}}})
    opts = model_options(cfg.models["m"])
    assert (opts.kv_cache_bytes, opts.max_sequences) == (1 << 20, 3)


# -- models ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_models_listed(lm_server: LiveServer, prefix: str) -> None:
    ids = [m.id for m in client(lm_server, prefix).models.list()]
    assert ids == [LM]
    assert client(lm_server, prefix).models.retrieve(LM).id == LM


# -- greedy text equals transformers' --------------------------------------------------------------------
def test_cold_then_warm_completion_is_transformers_greedy(lm_server: LiveServer, oracle: Oracle) -> None:
    lm_server.call(lambda: lm_server.plane.unload(LM))
    assert lm_server.repo.get(LM).state == "unloaded"
    want = oracle.greedy(oracle.encode(PROMPT), N)
    for attempt in ("cold", "warm"):
        r = client(lm_server).completions.create(model=LM, prompt=PROMPT, max_tokens=N, temperature=0)
        oracle.check_text(r.choices[0].text, want)
        assert r.object == "text_completion" and r.model == LM
        assert r.usage.prompt_tokens == len(want.prompt_ids), attempt
        assert r.usage.completion_tokens == len(want.ids), attempt
        assert r.usage.total_tokens == len(want.prompt_ids) + len(want.ids)
        assert r.choices[0].finish_reason == ("stop" if want.eos else "length")
    m = scrape(lm_server)
    assert m[f'cicada_cold_starts_total{{model="{LM}",outcome="success"}}'] >= 1


def test_the_first_request_of_a_fresh_cicada_serve(lm_dir: Path, oracle: Oracle, tmp_path: Path) -> None:
    """A real ``cicada serve`` process whose very first request is a completion: it cold-starts
    the model and answers transformers' greedy text (a process in which nothing ran before)."""
    from loadtest.soak import ServerProcess

    proc = ServerProcess(f'[models.{LM}]\nuri = "{lm_dir}"\ndtype = "float32"\n', tmp_path,
                         env={"HF_HUB_OFFLINE": "1"}).start()
    try:
        c = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.completions.create(model=LM, prompt=PROMPT, max_tokens=N, temperature=0)
        oracle.check_text(r.choices[0].text, oracle.greedy(oracle.encode(PROMPT), N))
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def test_chat_is_transformers_greedy_and_streams_the_same(lm_server: LiveServer, oracle: Oracle) -> None:
    want = oracle.greedy(oracle.chat_ids(MESSAGES), N)
    c = client(lm_server, "/openai/v1")
    r = c.chat.completions.create(model=LM, messages=MESSAGES, max_completion_tokens=N, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    oracle.check_text(r.choices[0].message.content or "", want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_ids), len(want.ids))
    chunks = list(c.chat.completions.create(model=LM, messages=MESSAGES, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    body = [ch for ch in chunks if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in body][-1] == r.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_streamed_completion_joins_to_the_whole(lm_server: LiveServer, oracle: Oracle) -> None:
    c = client(lm_server)
    whole = c.completions.create(model=LM, prompt=PROMPT, max_tokens=N, temperature=0)
    parts = list(c.completions.create(model=LM, prompt=PROMPT, max_tokens=N, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


async def test_four_concurrent_async_clients_get_the_greedy_text(lm_server: LiveServer, oracle: Oracle) -> None:
    prompts = [PROMPT, "Once upon a time", "In the beginning the", "import numpy as"]
    wants = [oracle.greedy(oracle.encode(p), N) for p in prompts]
    c = aclient(lm_server)

    async def one(p: str, stream: bool) -> str:
        if stream:
            s = await c.completions.create(model=LM, prompt=p, max_tokens=N, temperature=0, stream=True)
            return "".join([ch.choices[0].text async for ch in s])
        r = await c.completions.create(model=LM, prompt=p, max_tokens=N, temperature=0)
        return r.choices[0].text

    texts = await asyncio.gather(*(one(p, i % 2 == 1) for i, p in enumerate(prompts)))
    await c.close()
    for got, want in zip(texts, wants):
        oracle.check_text(got, want)


# -- parameters ----------------------------------------------------------------------------------------
def test_stop_string_cuts_the_text(lm_server: LiveServer, oracle: Oracle) -> None:
    c = client(lm_server)
    full = c.completions.create(model=LM, prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    if len(stop) < 3:
        pytest.skip(f"the greedy text is too short to cut: {full!r}")
    r = c.completions.create(model=LM, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(model=LM, prompt=PROMPT, max_tokens=N, temperature=0, stop=stop,
                                         stream=True))
    assert "".join(p.choices[0].text for p in streamed) == r.choices[0].text


def test_max_tokens_ends_with_length_and_counts(lm_server: LiveServer) -> None:
    r = client(lm_server).completions.create(model=LM, prompt=PROMPT, max_tokens=3, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_seeded_sampling_repeats(lm_server: LiveServer) -> None:
    c = client(lm_server)
    a, b = (c.completions.create(model=LM, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9,
                                 seed=7, extra_body={"ignore_eos": True}).choices[0].text for _ in range(2))
    assert a == b


def test_logprobs_shapes(lm_server: LiveServer) -> None:
    c = client(lm_server)
    r = c.completions.create(model=LM, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert len(lp.text_offset) == 5 and lp.text_offset[0] == 0
    assert all(len(t) == 2 and max(t.values()) <= 0 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(x - max(t.values())) < 1e-5 for x, t in zip(lp.token_logprobs, lp.top_logprobs))
    ch = c.chat.completions.create(model=LM, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                   top_logprobs=3, extra_body={"ignore_eos": True})
    content = ch.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(e.top_logprobs) == 3 and isinstance(e.bytes, list) for e in content)


# -- raw SSE framing -------------------------------------------------------------------------------------
async def test_raw_sse_framing_done_and_usage(lm_server: LiveServer) -> None:
    async with aiohttp.ClientSession(lm_server.http_url) as s:
        body = {"model": LM, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        async with s.post("/v1/completions", json=body) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks[:-1])
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        body = {"model": LM, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
        async with s.post("/v1/chat/completions", json=body) as r:
            chunks = [json.loads(e) for e in sse_events(await r.read())[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


# -- a client that hangs up --------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_sequence(lm_server: LiveServer) -> None:
    before = scrape(lm_server)
    body = json.dumps({"model": LM, "prompt": PROMPT, "max_tokens": 220, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", lm_server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"\r\n\r\n" not in got or got.count(b"data: ") < 2:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    after = wait_idle(lm_server, timeout_s=10, ended=1, before=before)
    key = f'vllm:generation_tokens_total{{model_name="{LM}"}}'
    generated = after.get(key, 0) - before.get(key, 0)
    assert f'cicada_kv_cache_budget_bytes{{model_name="{LM}"}}' in after
    assert generated < 220, f"the sequence ran to its end ({generated} tokens) after the client left"
    aborted = f'vllm:request_success_total{{model_name="{LM}",finished_reason="abort"}}'
    assert after.get(aborted, 0) >= before.get(aborted, 0) + 1
    assert time.monotonic() - t0 < 10
    r = client(lm_server).completions.create(model=LM, prompt="still there?", max_tokens=2, temperature=0)
    assert r.choices[0].text is not None


def test_client_leaving_during_the_cold_start_frees_its_place(lm_server: LiveServer) -> None:
    """Nothing is written before the first token: the server notices the hang-up by watching the
    connection, not by a failed write. The load goes on (as V2's), and the model ends warm."""
    lm_server.call(lambda: lm_server.plane.unload(LM))
    before = scrape(lm_server)
    body = json.dumps({"model": LM, "prompt": PROMPT, "max_tokens": 50, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", lm_server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    after = wait_idle(lm_server, timeout_s=30, ended=1, before=before)
    aborted = f'vllm:request_success_total{{model_name="{LM}",finished_reason="abort"}}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    lm_server.wait_until(lambda: lm_server.repo.get(LM).state == "ready", timeout=30)


async def test_an_error_after_the_stream_began_is_an_event(lm_server: LiveServer) -> None:
    """Unloading the model under a running sequence fails it: the stream says so and ends."""
    body = {"model": LM, "prompt": PROMPT, "max_tokens": 220, "temperature": 0, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession(lm_server.http_url) as s:
        async with s.post("/v1/completions", json=body) as r:
            assert r.status == 200
            events: list[bytes] = []
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line.strip()[len(b"data: "):])
                    if len(events) == 2:
                        async with s.post(f"/v2/repository/models/{LM}/unload") as u:
                            assert u.status == 200
    assert events[-1] == b"[DONE]"
    err = openai_error(events[-2])
    assert err["type"] == "server_error" and "unload" in str(err["message"])
    assert len(events) < 220


# -- metrics --------------------------------------------------------------------------------------------
def test_generation_metrics(lm_server: LiveServer) -> None:
    before = scrape(lm_server)
    r = client(lm_server).completions.create(model=LM, prompt=PROMPT, max_tokens=5, temperature=0,
                                              extra_body={"ignore_eos": True})
    m = wait_idle(lm_server, ended=1, before=before)
    lab = f'{{model_name="{LM}"}}'

    def grew(name: str) -> float:
        return m.get(name + lab, 0) - before.get(name + lab, 0)

    assert grew("vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("vllm:generation_tokens_total") == 5
    assert grew("vllm:time_to_first_token_seconds_count") == 1
    assert grew("vllm:inter_token_latency_seconds_count") == 4
    assert grew("vllm:e2e_request_latency_seconds_count") == 1
    assert m[f"cicada_kv_cache_budget_bytes{lab}"] > 0
    assert m[f"vllm:num_requests_waiting{lab}"] == 0 and m[f"vllm:kv_cache_usage_perc{lab}"] == 0
