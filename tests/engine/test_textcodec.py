"""The engine's tokenizer side against transformers' and tokenizers' own full decode."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.local import LocalBackend
from cicada_async.engine.modeldir import read_model_spec
from cicada_async.engine.textcodec import Detokenizer, TextCodec, read_codec
from cicada_async.models.catalogue import make_model
from protocols.errors import BadRequest
from protocols.generation import ChatMessage

MIXED = "héllo wörld — 日本語 🎉 ñ 한국어 🧑‍🚀"
# Characters of 1 to 4 UTF-8 bytes, so byte-level tokens split them.
ALPHABET = "ab é\nü—日本語한🎉🧑‍"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _codec(d: Path) -> TextCodec:
    async def go() -> TextCodec:
        backend = LocalBackend(d)
        try:
            return await read_codec(backend, await read_model_spec(backend), name=d.name)
        finally:
            await backend.aclose()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny-qwen2", tmp_path_factory.mktemp("lm") / "tiny-qwen2", seed=1)


@pytest.fixture(scope="module")
def codec(lm_dir: Path) -> TextCodec:
    return _codec(lm_dir)


@pytest.fixture(scope="module")
def oracle(lm_dir: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(lm_dir)


def _run(detok: Detokenizer, ids: Sequence[int], chunks: Sequence[int]) -> tuple[list[str], bool, str]:
    """Push ``ids`` in chunks of the given sizes (cycled): the pieces, whether a stop hit, and
    what flush gave (nothing after a stop: the engine does not flush a stopped sequence)."""
    pieces: list[str] = []
    i = k = 0
    while i < len(ids):
        n = max(1, chunks[k % len(chunks)]) if chunks else 1
        text, stopped = detok.push(ids[i:i + n])
        pieces.append(text)
        i, k = i + n, k + 1
        if stopped:
            return pieces, True, ""
    return pieces, False, detok.flush()


def _expected(full: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Generation ends at the first character that completes a stop string (the longest, if
    several end there), and the text ends right before that stop string."""
    for end in range(1, len(full) + 1):
        done = [len(s) for s in stop if full[:end].endswith(s)]
        if done:
            return full[:end - max(done)], True
    return full, False


# --- read_codec against transformers ---------------------------------------------------------

def test_codec_agrees_with_transformers(codec: TextCodec, oracle: Any) -> None:
    assert codec.context_length == 256
    assert codec.vocab_size == len(oracle) == 1000
    assert codec.eos_token_ids == frozenset({oracle.eos_token_id, oracle.convert_tokens_to_ids("<|im_end|>")})
    ids = codec.encode(MIXED)
    assert ids == oracle.encode(MIXED)
    assert codec.decode(ids) == oracle.decode(ids, skip_special_tokens=True) == MIXED
    chat = [ChatMessage("system", "Be brief."), ChatMessage("user", MIXED)]
    want = oracle.apply_chat_template([{"role": m.role, "content": m.content} for m in chat],
                                      tokenize=True, add_generation_prompt=True, return_dict=False)
    assert codec.render_chat(chat) == list(want)
    assert codec.decode(codec.render_chat(chat)) == "system\nBe brief.\nuser\n" + MIXED + "\nassistant\n"


def test_token_logprob_gives_each_tokens_bytes(codec: TextCodec, oracle: Any) -> None:
    everything = list(range(codec.vocab_size))
    raw = b"".join(bytes(codec.token_logprob(i, -1.0).bytes) for i in everything)
    assert raw.decode("utf-8", "replace") == oracle.decode(everything, skip_special_tokens=False)
    for i in everything:
        tl = codec.token_logprob(i, -0.5)
        assert tl.logprob == -0.5
        assert tl.token == oracle.decode([i], skip_special_tokens=False)
    end = codec.token_logprob(oracle.convert_tokens_to_ids("<|im_end|>"), 0.0)
    assert (end.token, bytes(end.bytes)) == ("<|im_end|>", b"<|im_end|>")
    # a token that is the first bytes of a character: raw bytes, U+FFFD in its text
    (first, *_) = oracle.encode("日")
    if len(oracle.encode("日")) > 1:
        tl = codec.token_logprob(first, 0.0)
        assert bytes(tl.bytes) == "日".encode()[:len(tl.bytes)] and tl.token.endswith("\ufffd")
    assert codec.token_logprob(codec.vocab_size + 7, 0.0).bytes == ()


async def test_read_codec_refuses_a_model_that_does_not_generate(tmp_path: Path, lm_dir: Path) -> None:
    bert = make_model("tiny-bert", tmp_path / "bert")
    backend = LocalBackend(bert)
    try:
        with pytest.raises(BadRequest, match="model bert does not generate text"):
            await read_codec(backend, await read_model_spec(backend), name="bert")
    finally:
        await backend.aclose()
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(lm_dir, bare)
    (bare / "tokenizer.json").unlink()
    backend = LocalBackend(bare)
    try:
        with pytest.raises(BadRequest, match="does not generate text: .*no tokenizer.json"):
            await read_codec(backend, await read_model_spec(backend))
    finally:
        await backend.aclose()


def _edited(lm_dir: Path, dst: Path, **files: dict[str, Any] | None) -> Path:
    """A copy of the model dir with some JSON files edited (None: removed)."""
    shutil.copytree(lm_dir, dst)
    for stem, content in files.items():
        path = dst / f"{stem}.json"
        if content is None:
            path.unlink()
        else:
            path.write_text(json.dumps(content))
    return dst


def test_chat_template_absent_or_refusing_is_a_bad_request(tmp_path: Path, lm_dir: Path) -> None:
    cfg = json.loads((lm_dir / "tokenizer_config.json").read_text())
    plain = _codec(_edited(lm_dir, tmp_path / "plain", tokenizer_config={
        k: v for k, v in cfg.items() if k != "chat_template"}))
    with pytest.raises(BadRequest, match="no chat template"):
        plain.render_chat([ChatMessage("user", "hi")])
    assert plain.encode("hi") == _codec(lm_dir).encode("hi")  # completions still work

    strict = dict(cfg, chat_template="{% for m in messages %}{% if m['role'] == 'tool' %}"
                  "{{ raise_exception('no tools here') }}{% endif %}{{ m['content'] }}{% endfor %}")
    codec = _codec(_edited(lm_dir, tmp_path / "strict", tokenizer_config=strict))
    assert codec.decode(codec.render_chat([ChatMessage("user", "hi")])) == "hi"
    with pytest.raises(BadRequest, match="no tools here"):
        codec.render_chat([ChatMessage("tool", "x")])

    # transformers 5 writes the template beside tokenizer_config.json
    moved = _edited(lm_dir, tmp_path / "jinja", tokenizer_config={
        k: v for k, v in cfg.items() if k != "chat_template"})
    (moved / "chat_template.jinja").write_text(cfg["chat_template"])
    assert _codec(moved).render_chat([ChatMessage("user", "hi")]) == _codec(lm_dir).render_chat(
        [ChatMessage("user", "hi")])


def test_eos_ids_fall_back_from_generation_config_to_config_to_tokenizer(tmp_path: Path, lm_dir: Path) -> None:
    config = json.loads((lm_dir / "config.json").read_text())
    assert _codec(lm_dir).eos_token_ids == {0, 2}  # generation_config.json's list
    assert _codec(_edited(lm_dir, tmp_path / "a", generation_config={"eos_token_id": 2})).eos_token_ids == {2}
    assert _codec(_edited(lm_dir, tmp_path / "b", generation_config=None)).eos_token_ids == {0}
    tok_cfg = json.loads((lm_dir / "tokenizer_config.json").read_text())
    only_tok = _edited(lm_dir, tmp_path / "c", generation_config=None,
                       config=dict(config, eos_token_id=None),
                       tokenizer_config=dict(tok_cfg, eos_token="<|im_end|>"))
    assert _codec(only_tok).eos_token_ids == {2}


# --- the detokenizer: exact against the full decode ------------------------------------------

@SETTINGS
@given(ids=st.lists(st.integers(0, 1005), max_size=60), chunks=st.lists(st.integers(1, 4), max_size=5))
def test_any_token_stream_streams_its_full_decode(codec: TextCodec, oracle: Any, ids: list[int],
                                                  chunks: list[int]) -> None:
    """Random ids (special ones, lone bytes that are no character, ids past the vocabulary):
    the pieces joined are transformers' decode, and each prefix of them is a prefix of it."""
    pieces, stopped, rest = _run(codec.detokenizer(), ids, chunks)
    full = oracle.decode(ids, skip_special_tokens=True)
    assert not stopped and "".join(pieces) + rest == full
    so_far = ""
    for p in pieces:
        so_far += p
        assert full.startswith(so_far)  # nothing emitted ever changes: no split character


@SETTINGS
@given(text=st.text(ALPHABET, max_size=40), chunks=st.lists(st.integers(1, 3), max_size=4))
def test_split_characters_are_held_until_whole(codec: TextCodec, oracle: Any, text: str,
                                               chunks: list[int]) -> None:
    ids = oracle.encode(text)
    pieces, _, rest = _run(codec.detokenizer(), ids, chunks)
    assert "".join(pieces) + rest == text
    assert not any("\ufffd" in p for p in pieces)


@SETTINGS
@given(ids=st.lists(st.integers(3, 258), max_size=40))
def test_byte_tokens_in_any_order(codec: TextCodec, oracle: Any, ids: list[int]) -> None:
    """Only the 256 single-byte tokens: invalid and truncated UTF-8 everywhere."""
    pieces, _, rest = _run(codec.detokenizer(), ids, [1])
    assert "".join(pieces) + rest == oracle.decode(ids, skip_special_tokens=True)


@SETTINGS
@given(text=st.text(ALPHABET, max_size=40), data=st.data())
def test_stop_strings_anywhere(codec: TextCodec, oracle: Any, text: str, data: st.DataObject) -> None:
    """Stop strings cut from the text itself (so they span tokens, or begin it) or made up:
    the output is the text up to the first one, and a prefix that never completes is text."""
    ids = oracle.encode(text)
    cuts = st.tuples(st.integers(0, len(text)), st.integers(1, 6)).map(lambda c: text[c[0]:c[0] + c[1]])
    stop = data.draw(st.lists(st.one_of(cuts, st.text(ALPHABET, min_size=1, max_size=4))
                              .filter(bool), min_size=1, max_size=4))
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=4))
    pieces, stopped, rest = _run(codec.detokenizer(stop), ids, chunks)
    want, want_stop = _expected(oracle.decode(ids, skip_special_tokens=True), stop)
    assert ("".join(pieces) + rest, stopped) == (want, want_stop)
    assert not any(s in "".join(pieces[:i + 1]) for s in stop for i in range(len(pieces)))


def test_stop_string_at_the_start_and_flush(codec: TextCodec) -> None:
    ids = codec.encode("Hello world")
    pieces, stopped, _ = _run(codec.detokenizer(["Hel"]), ids, [1])
    assert stopped and "".join(pieces) == ""

    detok = codec.detokenizer(["world!"])
    out = [detok.push([i])[0] for i in ids]
    assert "".join(out) == "Hello "  # "world" could still become "world!"
    assert detok.flush() == "world" and not detok.stopped
    with pytest.raises(RuntimeError):
        detok.push([1])

    detok = codec.detokenizer(["lo w"])  # spans the tokens "Hello" and " world"
    assert len(ids) > 1
    texts = [detok.push([i]) for i in ids]
    assert "".join(t for t, _ in texts) == "Hel" and texts[-1][1] and detok.stopped
    assert detok.push([5]) == ("", True) and detok.flush() == ""


def test_a_step_decodes_a_window_not_the_whole_sequence(codec: TextCodec, oracle: Any) -> None:
    text = "".join(sorted(__import__("pydoc_data.topics").topics.topics.values()))[:20000] + MIXED * 20
    ids = oracle.encode(text)
    decoded = 0

    def counting(window: Sequence[int]) -> str:
        nonlocal decoded
        decoded += len(window)
        return codec.decode(window)

    detok = Detokenizer(counting)
    out = "".join(detok.push([i])[0] for i in ids) + detok.flush()
    assert out == text
    assert decoded < 8 * len(ids), f"{decoded / len(ids):.1f} ids decoded per token"


# --- a SentencePiece-style tokenizer with byte fallback (Llama 2, Mistral) -----------------------

def _byte_fallback_tokenizer_json() -> str:
    """A Metaspace BPE over the same corpus, with Llama 2's <0xNN> byte tokens and decoder."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainers.BpeTrainer(
        vocab_size=700, show_progress=False))
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    names = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *(t for t, _ in learned)]
    spec["model"].update(vocab={t: i for i, t in enumerate(names)}, byte_fallback=True, unk_token="<unk>")
    spec["added_tokens"] = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=True) for i, t in enumerate(names[:3])]
    tok2 = Tokenizer.from_str(json.dumps(spec))
    tok2.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return tok2.to_str()


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory, lm_dir: Path) -> tuple[TextCodec, Any]:
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("sp") / "tiny-sp"
    shutil.copytree(lm_dir, d)
    (d / "tokenizer.json").write_text(_byte_fallback_tokenizer_json())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(
        cfg, bos_token="<s>", eos_token="</s>", pad_token=None, extra_special_tokens=[])))
    return _codec(d), Tokenizer.from_file(str(d / "tokenizer.json"))


def test_byte_fallback_tokenizer_round_trips(sp: tuple[TextCodec, Any]) -> None:
    codec, tok = sp
    ids = codec.encode(MIXED)
    assert any(3 <= i < 259 for i in ids)  # CJK and emoji fall back to bytes
    assert codec.decode(ids) == tok.decode(ids) == MIXED
    pieces, _, rest = _run(codec.detokenizer(), ids, [1])
    assert "".join(pieces) + rest == MIXED
    assert bytes(codec.token_logprob(3 + 0xE6, 0.0).bytes) == b"\xe6"


@SETTINGS
@given(ids=st.lists(st.one_of(st.integers(0, 705), st.integers(3, 258)), max_size=50),
       chunks=st.lists(st.integers(1, 3), max_size=4))
def test_byte_fallback_stream_streams_its_full_decode(sp: tuple[TextCodec, Any], ids: list[int],
                                                      chunks: list[int]) -> None:
    codec, tok = sp
    pieces, _, rest = _run(codec.detokenizer(), ids, chunks)
    full = tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) + rest == full
    so_far = ""
    for p in pieces:
        so_far += p
        assert full.startswith(so_far)
