#!/usr/bin/env bash
# Regenerate agent/_pb from proto/ (or into $1, for the CI drift check). The -I<virtual>=proto
# mapping makes protoc emit imports as agent._pb.<path> while the proto packages (the wire
# names the kubelet dials) stay untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PATH="$(dirname "$PY"):$PATH"
OUT="${1:-.}"
mkdir -p "$OUT"
rm -rf "$OUT/agent/_pb/deviceplugin" "$OUT/agent/_pb/podresources"
"$PY" -m grpc_tools.protoc -Iagent/_pb=proto \
  --python_out="$OUT" --grpc_python_out="$OUT" --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  agent/_pb/deviceplugin/v1beta1/api.proto agent/_pb/podresources/v1/api.proto >/dev/null
for d in agent/_pb agent/_pb/deviceplugin agent/_pb/deviceplugin/v1beta1 agent/_pb/podresources agent/_pb/podresources/v1; do
  : > "$OUT/$d/__init__.py"
done
