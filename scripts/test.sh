#!/usr/bin/env bash
# The test command: lint, type-check, then the test suite (two workers). Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check qjax experiments tests
ruff format --check qjax experiments tests
mypy
pytest -q -n 2 "$@"
