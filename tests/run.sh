#!/usr/bin/env bash
# The test command (README Quickstart, and what CI runs): idempotent set-up, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash setup.sh)
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"
