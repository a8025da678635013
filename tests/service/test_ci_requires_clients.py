"""In CI (``$CI`` set) a missing tritonclient or kserve stops the test run at start instead of
silently skipping the service suite; outside CI the suite still skips (a laptop without the
test extra). A package that cannot be imported is simulated by a broken one first on the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _collect(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           "tests/service/test_dataplane.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("package", ["tritonclient", "kserve"])
def test_missing_client_is_an_error_in_ci(tmp_path: Path, package: str) -> None:
    shadow = tmp_path / package
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    env = {**base, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    in_ci = _collect({**env, "CI": "true"})
    assert in_ci.returncode == pytest.ExitCode.USAGE_ERROR, in_ci.stdout[-2000:] + in_ci.stderr[-2000:]
    assert package in in_ci.stderr and "CI is set" in in_ci.stderr, in_ci.stderr[-2000:]
    # Outside CI nothing changes: collection goes on.
    local = _collect(env)
    assert local.returncode == pytest.ExitCode.OK, local.stdout[-2000:] + local.stderr[-2000:]
