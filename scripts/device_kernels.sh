#!/usr/bin/env bash
# What the Pallas kernels need from a GPU, in one run that fits a 600 s device call: every step has
# a time limit (120 + 120 + 60 + 240 s; the benchmark stops cleanly at its 200 s budget and writes
# its results after every shape, so the limit only guards against a hang):
#   1. every kernel against its reference on the device (Triton and, on sm_90, Mosaic GPU),
#   2. the Hopper path's tile configs at M = 1024 and 4096 (K = N = 4096) and W4A16's blocks at
#      M = 1 and 16 (K = 4096, N = 12288), with XLA's bf16 matmul timed beside them,
#   3. the benchmark: all 8 layer shapes, every kernel, M = 1..4096, stopping cleanly at its budget.
# Results go to $OUT (the device tool's folder) or runs/device_kernels: device.txt, check.json,
# check.log, tune.log, bench.json, bench.md, bench.log. Run from the repository root:
#   bash scripts/device_kernels.sh
set -uo pipefail
out="${OUT:-runs/device_kernels}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
} | tee "$out/device.txt"
timeout 120 "$py" -m experiments.check_kernels --out "$out/check.json" 2>&1 | tee "$out/check.log"
timeout 120 "$py" -m experiments.tune_blocks --kernels bf16,w8a8-mgpu,fp8-mgpu --m 1024,4096 2>&1 |
  tee "$out/tune.log"
timeout 60 "$py" -m experiments.tune_blocks --kernels bf16,w4a16 --m 1,16 --k 4096 --n 12288 2>&1 |
  tee -a "$out/tune.log"
timeout 240 "$py" -m experiments.bench_kernels --time-budget-s 200 --out "$out/bench.json" --md "$out/bench.md" 2>&1 |
  tee "$out/bench.log"
