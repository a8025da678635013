#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA build of torch already installed: the exactness tests
# on CUDA and the cold-start benchmark (gpt2-medium and llama-1b, 1.1 B parameters, random
# weights made here), results into OUTDIR. Meant to finish in under 8 minutes.
#   scripts/gpu-check.sh OUTDIR
set -euo pipefail
out=${1:?usage: scripts/gpu-check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
# The project and its test needs, without touching the GPU build of torch.
"$py" -m pip install -q --no-deps -e . >/dev/null
"$py" -m pip install -q safetensors aiofiles aiohttp aiobotocore orjson transformers pytest pytest-asyncio pytest-timeout matplotlib >/dev/null
start=$(date +%s)
# 1. Exactness on CUDA (tiny models; the CPU suite runs in CI).
timeout 180 "$py" -m pytest -q -p no:cacheprovider tests/engine/test_exactness.py tests/engine/test_devices.py -k "cuda or staging" 2>&1 | tee "$out/exactness-cuda.txt"
# 2. Cold start on the GPU: cicada vs hf (from_pretrained then .to("cuda")) vs meta-mmap.
timeout 420 "$py" -m cicada_async bench cold-start --device cuda --models gpt2-medium,llama-1b \
  --strategies cicada,hf,meta-mmap --repeat 3 --dir "${MODELS_DIR:-models}" \
  --json "$out/cold-start-cuda.json" 2>&1 | tee "$out/cold-start-cuda.txt"
echo "gpu-check finished in $(( $(date +%s) - start )) s" | tee -a "$out/device.txt"
