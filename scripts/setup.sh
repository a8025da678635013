#!/usr/bin/env bash
# Creates .venv (if needed) and installs cicada-async with its test and bench extras.
# torch is pinned to the CPU build here; GPU users install their own torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
# nginx is the production-like HTTP origin of the storage tests and the remote benchmark.
# Debian's nginx-light is small; without root or apt the tests that need it fail and say why.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing nginx-light (HTTP origin for the storage tests)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) >/dev/null 2>&1 \
      || echo "could not install nginx-light; the nginx-origin tests will fail" >&2
  else
    echo "nginx is missing: install it (e.g. apt-get install nginx-light) for the nginx-origin tests" >&2
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.cicada-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test,bench]"
  touch "$stamp"
fi
