"""Bearer tokens: scopes, statuses, constant-time comparison, config and env, no leaks."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest
import torch

from cicada_async.service import auth
from cicada_async.service.config import AuthConfig, load_config
from protocols.errors import ConfigError
from tests.fixtures.server import FakeEngine, LiveServer, fake_config, live_server

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*geventhttpclient.*")]

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

INF = "inf-token-5b1e0c"
ADM = "adm-token-93d7aa"
BODY = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]})


def _server(protect_metrics: bool = False) -> Iterator[LiveServer]:
    engine = FakeEngine()
    cfg = fake_config()
    cfg.server.auth = AuthConfig(inference_tokens=["other-inf", INF], admin_tokens=[ADM],
                                 protect_metrics=protect_metrics)
    with live_server(cfg, engine_factory=lambda c: engine) as s:
        yield s


@pytest.fixture
def server() -> Iterator[LiveServer]:
    yield from _server()


def _h(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


ROUTES = [
    ("POST", "/v2/models/alpha/infer", "inference"),
    ("GET", "/v2/models/alpha", "inference"),
    ("GET", "/v2/models/alpha/ready", "inference"),
    ("GET", "/v2", "inference"),
    ("GET", "/v2/models", "inference"),
    ("POST", "/v2/repository/index", "admin"),
    ("POST", "/v2/repository/models/alpha/load", "admin"),
    ("POST", "/v2/repository/models/alpha/unload", "admin"),
]


@pytest.mark.parametrize("method,path,scope", ROUTES)
async def test_scopes_and_statuses(server: LiveServer, method: str, path: str, scope: str) -> None:
    right, wrong = (INF, ADM) if scope == "inference" else (ADM, INF)
    async with aiohttp.ClientSession(server.http_url) as s:
        data = BODY if path.endswith("infer") else None
        for token, status in [(None, 401), ("nope", 401), (INF + "x", 401), (INF[:-1], 401), (wrong, 403),
                              (right, 200)]:
            async with s.request(method, path, data=data, headers=_h(token)) as r:
                assert r.status == status, (token, path, await r.text())
                if status == 401:
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    assert r.headers["Content-Type"] == "application/json"
                if status == 403:
                    assert "insufficient_scope" in r.headers["WWW-Authenticate"]
                    assert scope in (await r.json())["error"]
        # Other schemes and malformed headers are treated as missing.
        for raw in ["Basic dXNlcjpwdw==", f"bearer{INF}", "Bearer", "Bearer  ", f"Token {INF}", "Bearer \u00e9"]:
            async with s.request(method, path, data=data, headers={"Authorization": raw}) as r:
                assert r.status == 401, raw


async def test_health_and_metrics_open_without_token(server: LiveServer) -> None:
    async with aiohttp.ClientSession(server.http_url) as s:
        for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            async with s.get(path) as r:
                assert r.status == 200, path
        async with s.get("/v2/does/not/exist") as r:  # unknown routes do not reveal themselves
            assert r.status == 401


async def test_protected_metrics() -> None:
    for s_ in _server(protect_metrics=True):
        async with aiohttp.ClientSession(s_.http_url) as s:
            async with s.get("/metrics") as r:
                assert r.status == 401
            for token in (INF, ADM):
                async with s.get("/metrics", headers=_h(token)) as r:
                    assert r.status == 200
            async with s.get("/v2/health/ready") as r:
                assert r.status == 200


def test_tritonclient_passes_headers(server: LiveServer) -> None:
    c = httpclient.InferenceServerClient(server.url)
    x = np.ones((1, 4), np.float32)
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        c.infer("alpha", [inp])
    assert "401" in str(e.value.status()) or "bearer" in e.value.message()
    res = c.infer("alpha", [inp], headers=_h(INF))
    want = (torch.from_numpy(x) @ server.sync(lambda: server.repo.get("alpha").instance.weight)).numpy()
    np.testing.assert_array_equal(res.as_numpy("y"), want)
    assert c.is_server_live() and c.is_server_ready()  # probes need no token
    with pytest.raises(InferenceServerException):
        c.load_model("beta", headers=_h(INF))  # 403: inference token on an admin route
    c.load_model("beta", headers=_h(ADM))
    assert c.get_model_repository_index(headers=_h(ADM))
    c.close()


def test_every_token_is_compared_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    ts = auth.TokenSet.from_config(AuthConfig(inference_tokens=["a1", "a2", "a3"], admin_tokens=["b1", "b2"]))
    assert ts.scopes(b"a1") == {"inference"}  # matches the first, still compares all five
    assert len(calls) == 5
    calls.clear()
    assert ts.scopes(b"zz") == set() and len(calls) == 5
    both = auth.TokenSet.from_config(AuthConfig(inference_tokens=["t"], admin_tokens=["t"]))
    assert both.scopes(b"t") == {"inference", "admin"}
    assert "a1" not in repr(ts) and "a1" not in repr(AuthConfig(inference_tokens=["a1"]))


def test_config_table_and_env(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[server.auth]\ninference_tokens = ["i1"]\nadmin_tokens = ["a1"]\nprotect_metrics = true\n')
    cfg = load_config(p)
    a = auth.merge_env(cfg.server.auth, {"CICADA_INFERENCE_TOKENS": "i2, i1 ,", "CICADA_ADMIN_TOKENS": "a2"})
    assert a.inference_tokens == ["i1", "i2"] and a.admin_tokens == ["a1", "a2"] and a.protect_metrics
    assert auth.merge_env(AuthConfig(), {}).enabled is False
    p.write_text('[server.auth]\ninference_tokens = ["has space secret"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "secret" not in str(e.value)
    p.write_text('[server.auth]\ntokens = ["x"]\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(p)


async def test_tokens_never_logged(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession(server.http_url) as s:
        for token in (INF, ADM, "wrong-secret-value"):
            for path in ("/v2/models/alpha/infer", "/v2/repository/models/nope/load", "/v2/models/nope/infer"):
                async with s.post(path, data=b"{bad", headers=_h(token)) as r:
                    body = await r.text()
                    assert token not in body
    text = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    for token in (INF, ADM, "wrong-secret-value"):
        assert token not in text


async def test_expect_continue_checks_the_token_first(server: LiveServer) -> None:
    import asyncio

    for headers, want in [("", b" 401 "), (f"Authorization: Bearer {ADM}\r\n", b" 403 "),
                          (f"Authorization: Bearer {INF}\r\n", b" 100 ")]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write((f"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n{headers}"
                          "Expect: 100-continue\r\n\r\n").encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()
        # Without a valid token nobody learns whether model 'nope' exists (404 vs 100).
        assert want in line or (want == b" 100 " and b" 404 " in line), (headers, line)
