"""``cicada pack`` writes the checkpoint in execution order; the load verifies its sha256."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protocols.errors import IntegrityError

from tests.fixtures.helpers import assert_equal_outputs, cicada_infer, inputs_for, reference


def test_pack_in_execution_order_then_load_verifies(model_dirs, tmp_path):
    src = model_dirs["tiny-gpt2"]
    dst = tmp_path / "packed"
    r = subprocess.run([sys.executable, "-m", "cicada_async", "pack", str(src), str(dst)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((dst / "cicada.manifest.json").read_text())
    order = manifest["order"]
    # Execution order, not the alphabetical order safetensors writers use.
    assert order[0] == "transformer.wte.weight"
    assert order.index("transformer.h.1.ln_1.weight") < order.index("transformer.ln_f.weight")
    header_len = int.from_bytes((dst / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((dst / "model.safetensors").read_bytes()[8 : 8 + header_len])
    by_offset = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in by_offset] == order

    inputs = inputs_for(src)
    assert_equal_outputs(reference(src, inputs), asyncio_run(cicada_infer(dst, inputs)))
    assert_equal_outputs(reference(src, inputs), asyncio_run(cicada_infer(dst, inputs, dtype=None)))

    # One flipped bit in tensor data: the header still parses, the digest does not match.
    raw = bytearray((dst / "model.safetensors").read_bytes())
    raw[-5] ^= 0x01
    (dst / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="SHA-256"):
        asyncio_run(cicada_infer(dst, inputs))


def asyncio_run(coro):  # type: ignore[no-untyped-def]
    import asyncio

    return asyncio.run(coro)
