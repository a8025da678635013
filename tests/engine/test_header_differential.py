"""safetensors header validation, checked differentially against the safetensors library.

Every hand-made malformed file below is given to the library (``safe_open`` and ``load``) and
to our parser (``header_length`` + ``parse_header``). Wherever the library refuses a file, we
must refuse it too, with a ``CheckpointError`` whose message names the problem. Files we refuse
that the library accepts are listed in ``EXTRA_REJECTIONS`` (each a deliberate, documented
choice); any other disagreement fails the test. A time-boxed hypothesis fuzz of the parser
checks that it only ever raises ``CheckpointError``.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cicada_async.engine.headers import DTYPE_BITS, LOADABLE_DTYPES, MAX_HEADER_BYTES, header_length, parse_header
from protocols.errors import CheckpointError


def _file(header: Any, data: bytes = b"", *, raw_header: bytes | None = None, declared: int | None = None) -> bytes:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(h) if declared is None else declared
    return struct.pack("<Q", n) + h + data


def _t(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD_HEADER = {"a": _t("F32", [2], 0, 8), "b": _t("I64", [1], 8, 16)}
GOOD_DATA = bytes(16)


@dataclass(frozen=True)
class Case:
    name: str
    blob: bytes
    needle: str  # a substring our CheckpointError message must contain


CASES: list[Case] = [
    Case("empty file", b"", "too short"),
    Case("seven bytes", b"\x01" * 7, "too short"),
    Case("header length above 100 MB", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds the limit"),
    Case("header length 2**64-1", b"\xff" * 8 + b"{}", "exceeds the limit"),
    Case("header runs past the end", _file(GOOD_HEADER, GOOD_DATA, declared=10_000), "runs past the end"),
    Case("header not UTF-8", _file(None, raw_header=b'{"a\xff\xfe": 1}'), "not UTF-8"),
    Case("header not JSON", _file(None, raw_header=b"{not json at all"), "not valid JSON"),
    Case("header JSON array", _file([1, 2, 3]), "not a JSON object"),
    Case("header JSON string", _file("hello"), "not a JSON object"),
    Case("garbage after the JSON", _file(None, raw_header=json.dumps(GOOD_HEADER).encode() + b"xx") + GOOD_DATA,
         "not valid JSON"),
    Case("entry not an object", _file({"a": [1, 2]}), "not an object"),
    Case("unknown dtype", _file({"a": _t("F128", [1], 0, 16)}, bytes(16)), "unknown dtype"),
    Case("missing dtype", _file({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "unknown dtype"),
    Case("negative dimension", _file({"a": _t("F32", [-1], 0, 4)}, bytes(4)), "invalid shape"),
    Case("shape not a list", _file({"a": _t("F32", "2", 0, 8)}, bytes(8)), "invalid shape"),
    Case("fractional dimension", _file({"a": _t("F32", [1.5], 0, 4)}, bytes(4)), "invalid shape"),
    Case("three data_offsets", _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, bytes(4)),
         "invalid data_offsets"),
    Case("negative offset", _file({"a": _t("F32", [1], -4, 0)}, bytes(4)), "invalid data_offsets"),
    Case("end before start", _file({"a": _t("U8", [0], 4, 0), "b": _t("U8", [4], 0, 4)}, bytes(4)),
         "ends before it starts"),
    Case("size differs from shape x itemsize", _file({"a": _t("F32", [3], 0, 8)}, bytes(8)), "needs 12"),
    Case("shape product overflows u64",
         _file({"a": _t("F32", [2**32, 2**32, 2**32], 0, 8)}, bytes(8)), "overflows"),
    Case("first tensor not at offset 0", _file({"a": _t("F32", [1], 4, 8)}, bytes(8)), "gap"),
    Case("gap between tensors",
         _file({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, bytes(12)), "gap"),
    Case("overlapping tensors",
         _file({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, bytes(12)), "overlaps"),
    Case("duplicate tensor name",
         _file(None, raw_header=b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}') + bytes(8),
         "duplicate"),
    Case("data truncated", _file(GOOD_HEADER, GOOD_DATA[:-3]), "truncated"),
    Case("trailing bytes after the last tensor (polyglot)", _file(GOOD_HEADER, GOOD_DATA + b"PK\x03\x04zip"),
         "unexpected bytes"),
    Case("__metadata__ not string to string", _file({"__metadata__": {"k": 1}, **GOOD_HEADER}, GOOD_DATA),
         "__metadata__"),
    Case("boolean dimension", _file({"a": _t("F32", [True], 0, 4)}, bytes(4)), "invalid shape"),
    Case("F8_E8M0 (a dtype we do not map)", _file({"a": _t("F8_E8M0", [4], 0, 4)}, bytes(4)), "unknown dtype"),
    Case("complex64 tensor (C64)", _file({"c": _t("C64", [2], 0, 16)}, bytes(16)), "unknown dtype"),
    Case("pickle renamed .safetensors", pickle.dumps({"w": list(range(100))}, protocol=4), "exceeds the limit"),
]


def _torch_pickle() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(8)}, buf)
    return buf.getvalue()


def library_accepts(blob: bytes, tmp: Path) -> bool:
    """True when safetensors opens the file and reads every tensor."""
    path = tmp / "f.safetensors"
    path.write_bytes(blob)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        st_load(blob)
    except Exception:  # the library raises SafetensorError, OSError, ValueError...
        return False
    return True


def ours(blob: bytes) -> CheckpointError | None:
    """Our verdict: None when accepted, else the CheckpointError (anything else propagates)."""
    try:
        n = header_length(blob[:8], key="f.safetensors", size=len(blob))
        parse_header(blob[8 : 8 + n], key="f.safetensors", size=len(blob))
    except CheckpointError as e:
        return e
    return None


# Files the library accepts and we refuse, on purpose (documented in docs/reliability.md).
EXTRA_REJECTIONS: dict[str, str] = {
    "complex64 tensor (C64)": "no served architecture has complex weights; the loader maps no complex dtype",
}


@pytest.mark.parametrize("case", CASES + [Case("torch.save pickle renamed", _torch_pickle(), "exceeds the limit")],
                         ids=lambda c: c.name)
def test_every_library_rejection_is_ours_too(case: Case, tmp_path: Path) -> None:
    lib_ok = library_accepts(case.blob, tmp_path)
    err = ours(case.blob)
    if not lib_ok:
        assert err is not None, f"{case.name}: safetensors rejects this file but we accept it"
    if err is not None:
        assert case.needle in str(err), f"{case.name}: unclear message {err}"
        assert "f.safetensors" in str(err), "the message names the file"
        if lib_ok:
            assert case.name in EXTRA_REJECTIONS, f"{case.name}: we reject a file the library accepts ({err})"
    else:
        pytest.fail(f"{case.name}: accepted by our parser")


def test_every_header_check_is_reached_by_a_case() -> None:
    """Each ``raise CheckpointError`` of the header parser is where some corpus file stops: a
    check added without a hostile file to prove it, or one no file can reach, fails here."""
    import ast
    import traceback

    import cicada_async.engine.headers as headers

    src = Path(headers.__file__)
    parsers = {"header_length", "_no_duplicates", "parse_header", "_entry"}
    sites = {
        node.lineno
        for fn in ast.walk(ast.parse(src.read_text()))
        if isinstance(fn, ast.FunctionDef) and fn.name in parsers
        for node in ast.walk(fn)
        if isinstance(node, ast.Raise) and node.exc is not None and "CheckpointError" in ast.unparse(node.exc)
    }
    reached = set()
    for case in CASES:
        err = ours(case.blob)
        assert err is not None, case.name
        e: BaseException | None = err
        while e is not None:  # a check inside json.loads is re-raised with the file's name
            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(src)]
            if frames:
                reached.add(frames[-1].lineno)
            e = e.__context__
    assert sites and sites <= reached, f"header checks no case reaches: lines {sorted(sites - reached)} of {src.name}"


def test_loadable_dtypes_are_the_ones_torch_builds() -> None:
    """The parser's default dtypes are exactly those bytes become tensors of, at their widths."""
    from cicada_async.engine.tensorbytes import TORCH_DTYPES

    assert LOADABLE_DTYPES.keys() == TORCH_DTYPES.keys()
    for code, dt in TORCH_DTYPES.items():
        assert LOADABLE_DTYPES[code] == DTYPE_BITS[code] == dt.itemsize * 8, code


def test_valid_files_accepted_by_both(tmp_path: Path) -> None:
    blobs = [
        _file(GOOD_HEADER, GOOD_DATA),
        st_save({"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "e": torch.zeros(0, 3)}),
        st_save({"b": torch.ones(3, dtype=torch.bfloat16)}, metadata={"format": "pt"}),
        # Leading/trailing spaces in the header: writers pad it for alignment.
        _file(None, raw_header=b"   " + json.dumps(GOOD_HEADER).encode() + b"    ") + GOOD_DATA,
        _file({}),  # no tensors at all
    ]
    for blob in blobs:
        assert library_accepts(blob, tmp_path)
        assert ours(blob) is None


# -- fuzz -------------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", ""]),
     "shape": st.lists(st.integers(-2, 2**40), max_size=4),
     "data_offsets": st.lists(st.integers(-2, 64), min_size=0, max_size=3)},
    optional={"extra": _json_values},
)
_headers = st.dictionaries(st.text(max_size=6), _entries | _json_values, max_size=5)


@st.composite
def blobs(draw: Callable[..., Any]) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # raw bytes
        return draw(st.binary(max_size=64))
    if kind == 1:  # a structured header with random data
        header = json.dumps(draw(_headers)).encode()
        return struct.pack("<Q", len(header)) + header + draw(st.binary(max_size=64))
    if kind == 2:  # a valid file with bytes flipped
        blob = bytearray(_file(GOOD_HEADER, GOOD_DATA))
        for i in draw(st.lists(st.integers(0, len(blob) - 1), max_size=4)):
            blob[i] = draw(st.integers(0, 255))
        return bytes(blob)
    # an arbitrary declared length over arbitrary text
    header = draw(st.text(max_size=64)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + header


# Every example runs (no early return under a time box); the test's own timeout bounds it, and
# no per-example deadline can flake on a loaded machine.
@pytest.mark.timeout(120)
@settings(max_examples=1_500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False,
          database=None)
@given(blobs())
def test_fuzz_parser_only_raises_checkpoint_error(blob: bytes) -> None:
    ours(blob)  # anything but CheckpointError (or a hang past `deadline`) fails the test
