#!/usr/bin/env bash
# Regenerate protos/v1/*_pb2*.py(i) from the .proto files. Run from anywhere; commit the result.
# The grpcio-tools version is pinned in pyproject's dev extra so that output is reproducible.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/v1/telemetry.proto protos/v1/agent.proto
echo "generated: $(ls protos/v1/*_pb2*.py* | tr '\n' ' ')"
