#!/usr/bin/env bash
# The test command: lint (ruff, the import rules), type-check, then the test suite (two workers).
# Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check qjax experiments examples tests scripts
ruff format --check qjax experiments examples tests scripts
python scripts/check_imports.py
mypy
pytest -q -n 2 "$@"
