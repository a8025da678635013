#!/usr/bin/env bash
# The test command: sets up .venv if needed, type-checks, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
# The type check first (pyproject's [tool.mypy]: strict, no explicit Any on the seams): any
# error fails the run before a test starts.
python -m mypy
exec python -m pytest -q "$@"
