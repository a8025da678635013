#!/usr/bin/env bash
# Regenerate protocols/grpc_v2_pb2.py from protocols/grpc_v2.proto (the output is committed, so
# serving needs grpcio and protobuf but not grpcio-tools). Needs grpcio-tools in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m grpc_tools.protoc -Iprotocols --python_out=protocols --pyi_out=protocols protocols/grpc_v2.proto
