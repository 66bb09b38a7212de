#!/usr/bin/env bash
# The whole suite: tools, lint, types, generated-code drift, then pytest (all tiers).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"

scripts/setup-tools.sh

echo "== ruff"
ruff check agent tests bench
echo "== mypy --strict"
mypy agent
echo "== import layers (lint-imports)"
lint-imports
echo "== generated protobuf code is up to date"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
scripts/gen_protos.sh "$tmp"
diff -r -x __pycache__ agent/_pb "$tmp/agent/_pb" || { echo "agent/_pb is stale: run 'make proto' and commit"; exit 1; }
echo "== pytest"
python -m pytest "$@"
