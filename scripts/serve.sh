#!/usr/bin/env bash
# The main job on its embedded default: a demo model (gpt2 with random weights) made on first
# run into ./models/repository, served over the V2 protocol from local disk on $PORT (8080).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
repo=models/repository
if [ ! -f "$repo/gpt2/model.safetensors" ]; then
  echo "making the demo model (gpt2, random weights) in $repo/gpt2 ..."
  cicada make-model gpt2 "$repo/gpt2"
fi
exec cicada serve --model-repository "$repo" "$@"
