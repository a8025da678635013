"""A completion's tokenizer does not wait for transformers' import (issue 26, Deliver 2).

In a fresh ``cicada serve`` the engine imports transformers on its executor (seconds) while the
first request arrives. The codec used to build the chat template's transformers tokenizer when it
was read, under the lock that import holds (``hfimport``), so a completion's prompt, and the cold
load that starts once it is tokenized, waited for the whole import. The template is now built on
the first chat: reading the codec and encoding a prompt go on while that lock is held.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from backends.local import LocalBackend
from cicada_async.engine import hfimport
from cicada_async.engine.modeldir import read_model_spec
from cicada_async.engine.textcodec import TextCodec, read_codec
from cicada_async.models.catalogue import make_model
from protocols.generation import ChatMessage


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny-qwen2", tmp_path_factory.mktemp("lm") / "tiny-qwen2", seed=1)


async def _read(d: Path) -> TextCodec:
    backend = LocalBackend(d)
    try:
        return await read_codec(backend, await read_model_spec(backend), name=d.name)
    finally:
        await backend.aclose()


def _ready(codec: TextCodec) -> bool:
    return codec.chat_ready


def test_codec_reads_and_encodes_while_the_warm_import_holds_the_lock(lm_dir: Path) -> None:
    held, release = threading.Event(), threading.Event()

    def warm_import_in_flight() -> None:
        with hfimport._lock:  # what hfimport.warm holds for the seconds transformers imports
            held.set()
            release.wait(60)

    holder = threading.Thread(target=warm_import_in_flight, daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        codec = asyncio.run(asyncio.wait_for(_read(lm_dir), 20))  # before: blocked until release
        assert codec.encode("hello world")
        assert not _ready(codec)  # the template is there, its tokenizer not built yet
        rendered: list[list[int]] = []
        chat = threading.Thread(target=lambda: rendered.append(
            codec.render_chat([ChatMessage("user", "hi")])), daemon=True)
        chat.start()
        chat.join(0.5)
        assert chat.is_alive() and not rendered  # a chat waits for the import, as it must
    finally:
        release.set()
        holder.join(10)
    chat.join(30)
    assert _ready(codec) and rendered
    # The same ids as a codec whose template was built right away.
    again = asyncio.run(_read(lm_dir))
    assert again.render_chat([ChatMessage("user", "hi")]) == rendered[0]
