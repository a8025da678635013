"""The connection guard's start-up check of aiohttp's private internals: it passes on the
installed aiohttp, and the server refuses to start (ConfigError naming what is missing) on an
aiohttp without one of them, simulated by deleting it from aiohttp's own class.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from cicada_async.service.lifecycle import serve
from cicada_async.service.server import build_app
from protocols.errors import ConfigError
from tests.fixtures.server import FakeEngine, fake_config


async def _check() -> None:
    from cicada_async.service.connections import check_internals

    check_internals(asyncio.get_running_loop())


def test_installed_aiohttp_has_every_internal() -> None:
    asyncio.run(_check())


@pytest.mark.parametrize("cls,name", [
    (RequestHandler, "_messages"),
    (RequestHandler, "_request_in_progress"),
    (RequestHandler, "_request_count"),
    (web.AppRunner, "_make_server"),
])
def test_server_refuses_to_start_without_an_internal(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
    config = fake_config()
    app = build_app(config, engine_factory=lambda cfg: FakeEngine())
    monkeypatch.delattr(cls, name)

    async def start() -> None:
        # Before the check, the server started and served (here: until this bound).
        await asyncio.wait_for(serve(app, config, None), 5)

    with pytest.raises(ConfigError, match=f"{cls.__name__}.{name}"):
        asyncio.run(start())
