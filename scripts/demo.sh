#!/usr/bin/env bash
# The main job on its embedded default: make a demo model, cold-start it beside plain PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec cicada demo "$@"
