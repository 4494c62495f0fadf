#!/usr/bin/env bash
# Quantized training on a GPU, in one run of at most 170 s, for the second call of a lent device
# (after scripts/device_kernels.sh): the train step of a 2-block transformer (d 1024, 16 heads,
# batch 8 x 1024 tokens, bf16 parameters) in bf16 float, forward-only int8 / FP8 QAT and fully
# quantized int8 / FP8 training (the recipes int8, fp8_current, fp8_delayed, fp8_blockwise),
# medians of interleaved rounds (experiments.scripts.bench_train_step_device; 120 s for building,
# compiling and timing, the rounds cut short when it is spent), with the operand types each step's contractions were
# lowered to and the GEMM calls the compiler made of them.
# Results go to $OUT (the device tool's folder) or runs/device_training: device.txt,
# train_step.json, train_step.md, train_step.log. Run from the repository root:
#   bash scripts/device_training.sh
out_default=runs/device_training
source "$(dirname "$0")/device_env.sh"
timeout 170 "$py" -m experiments.scripts.bench_train_step_device --d 1024 --heads 16 --layers 2 \
  --batch 8 --tokens 1024 --rounds 20 --time-budget-s 120 \
  --out "$out/train_step.json" --md "$out/train_step.md" 2>&1 | tee "$out/train_step.log"
