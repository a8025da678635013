"""The type check guards the seams: an ``Any`` put back on one fails it.

scripts/test.sh runs mypy on the whole tree before the tests (zero errors, or CI is red). These
tests show that the check can fail: each copies the packages into a temporary tree, puts an
explicit ``Any`` back on one seam, and expects mypy to refuse that very line (the unchanged
file passes: it is part of the tree scripts/test.sh checks).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocols", "backends", "cicada_async")

# (file, the seam's declaration as it is, the same declaration with Any)
SEAMS = [
    pytest.param("protocols/serving.py",
                 "    async def infer(self, inputs: Inputs, *, priority: Priority) -> Tensors: ...",
                 "    async def infer(self, inputs: Any, *, priority: Priority) -> Tensors: ...",
                 id="served-model-protocol"),
    pytest.param("protocols/storage.py",
                 "    async def stat(self, key: str) -> ObjectInfo:",
                 "    async def stat(self, key: str) -> Any:",
                 id="storage-protocol"),
]


def _tree(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _mypy(tree: Path, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", target], cwd=tree,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("path", "typed", "untyped"), SEAMS)
def test_an_any_on_a_seam_fails_the_type_check(tmp_path: Path, path: str, typed: str, untyped: str) -> None:
    tree = _tree(tmp_path)
    source = (tree / path).read_text()
    assert source.count(typed) == 1, f"{path} no longer declares {typed.strip()!r}: update this test"
    lines = source.splitlines()
    lineno = lines.index(typed) + 1
    text = source.replace(typed, untyped)
    if "from typing import Any" not in text:
        text = text.replace("from __future__ import annotations\n",
                            "from __future__ import annotations\n\nfrom typing import Any\n", 1)
        lineno += 2
    (tree / path).write_text(text)
    broken = _mypy(tree, path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert f'{path}:{lineno}: error: Explicit "Any" is not allowed' in broken.stdout, broken.stdout
