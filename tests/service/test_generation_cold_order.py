"""A cold LM's first chat starts its load before the chat template is built (issue 26, Deliver 2).

In a fresh ``cicada serve`` transformers is still importing on the engine's executor when the
first request arrives (seconds; ``hfimport.warm`` holds the lock meanwhile). The chat template's
tokenizer needs that import, the weights' read does not: the load must start first, so that the
read overlaps the import, and the tokens stay transformers' greedy ones. Before, the codec read
built the template under that lock and the load started only after it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from cicada_async.engine import hfimport
from tests.fixtures.lm import LM, Oracle, lm_dir, lm_server, oracle  # noqa: F401
from tests.fixtures.server import LiveServer

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Say something about foxes."}]
N = 8


@pytest.fixture
def import_in_flight() -> Iterator[threading.Event]:
    """Holds the lock the warm import holds while transformers imports, until set."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with hfimport._lock:
            held.set()
            release.wait(60)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(10)
    try:
        yield release
    finally:
        release.set()
        t.join(10)


def test_first_chat_loads_while_the_import_holds_the_template(
        lm_server: LiveServer, oracle: Oracle, import_in_flight: threading.Event) -> None:
    lm_server.call(lambda: lm_server.plane.unload(LM))
    entry = lm_server.repo.get(LM)
    assert entry.state == "unloaded"
    want = oracle.greedy(oracle.chat_ids(MESSAGES), N)
    out: list[object] = []
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{lm_server.port}/v1", api_key="x", max_retries=0, timeout=60)

    def ask() -> None:
        try:
            out.append(c.chat.completions.create(model=LM, messages=MESSAGES, max_completion_tokens=N,
                                                 temperature=0))
        except Exception as e:  # noqa: BLE001 - asserted below
            out.append(e)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    # Before: the codec waited for the lock, and nothing loaded until the import ended.
    lm_server.wait_until(lambda: entry.loading is not None or entry.state in ("loading", "ready"), timeout=10)
    assert not out  # the chat itself waits for the template (the import)
    import_in_flight.set()
    t.join(60)
    r = out[0]
    assert not isinstance(r, Exception), r
    oracle.check_text(r.choices[0].message.content or "", want)  # type: ignore[attr-defined]
    assert r.usage.prompt_tokens == len(want.prompt_ids)  # type: ignore[attr-defined]
