"""Local weight files changed underneath a ready model: never a SIGBUS, never silently new weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cicada_async.engine.runtime import Engine, ModelOptions
from cicada_async.models.catalogue import make_model
from tests.fixtures.helpers import assert_equal_outputs, inputs_for, reference

pytestmark = pytest.mark.timeout(120)


def _weights(d: Path) -> Path:
    return next(p for p in sorted(d.iterdir()) if p.suffix == ".safetensors")


async def test_in_place_rewrite_reloads_instead_of_serving_changed_pages(
        model_dirs: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(model_dirs["tiny-gpt2"], d)
    other = make_model("tiny-gpt2", tmp_path / "other", seed=99)
    inputs = inputs_for(d)
    before = reference(d, inputs)
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions())
        assert_equal_outputs(await inst.infer(inputs), before)
        new = _weights(other).read_bytes()
        with open(_weights(d), "r+b") as f:  # rewritten in place: same inode, same size
            f.write(new)
        after = reference(d, inputs)
        assert_equal_outputs(await inst.infer(inputs), after)
        assert inst.cold_starts == 2, "the model computed on a file changed in place without reloading"
        assert_equal_outputs(await inst.infer(inputs), after)
        assert inst.cold_starts == 2


async def test_replace_by_rename_keeps_serving_the_loaded_weights(
        model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The documented way to update: the held file stays as loaded, no reload is forced."""
    d = tmp_path / "m"
    shutil.copytree(model_dirs["tiny-gpt2"], d)
    other = make_model("tiny-gpt2", tmp_path / "other", seed=99)
    inputs = inputs_for(d)
    before = reference(d, inputs)
    async with Engine() as engine:
        inst = engine.instance("m", str(d), ModelOptions())
        await inst.infer(inputs)
        tmp = d / "incoming.partial"
        shutil.copyfile(_weights(other), tmp)
        tmp.replace(_weights(d))
        assert_equal_outputs(await inst.infer(inputs), before)
        assert inst.cold_starts == 1


def test_truncated_file_is_an_error_not_a_sigbus(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """In a process of its own: on the old code this was a SIGBUS that killed the server."""
    d = tmp_path / "m"
    shutil.copytree(model_dirs["tiny-gpt2"], d)
    script = textwrap.dedent(f"""
        import asyncio, os
        from cicada_async.engine.runtime import Engine, ModelOptions
        from protocols.errors import CicadaError
        from tests.fixtures.helpers import inputs_for

        async def main():
            d = {str(d)!r}
            inputs = inputs_for(__import__("pathlib").Path(d))
            async with Engine() as engine:
                inst = engine.instance("m", d, ModelOptions())
                await inst.infer(inputs)
                path = {str(_weights(d))!r}
                os.truncate(path, os.path.getsize(path) // 2)
                try:
                    await inst.infer(inputs)
                except CicadaError as e:
                    print("ERROR", type(e).__name__, e)
                else:
                    print("ANSWERED")
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("ERROR "), proc.stdout + proc.stderr[-2000:]
