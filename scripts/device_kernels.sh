#!/usr/bin/env bash
# What the Pallas kernels need from a GPU, in one run of at most 530 s (8 minutes 50 seconds), so
# that a 15-minute device budget holds the machine's start, this run and a partial rerun. Every step
# has a time limit (120 + 160 + 70 + 100 + 70 + 10 s, in the order of the steps; the check, the
# benchmarks and the profile stop cleanly at their budgets and write their results as they go, so
# the limits only guard against a hang). Times are CUPTI's kernel durations where CUPTI works (experiments.kernels.timing),
# else the wall clock; the logs say which.
#   1. every kernel against its reference on the device (Triton, W8A8 / FP8 also with K split in
#      unequal ranges), and the experimental ones (qjax.kernels.experimental, untimed so far: the
#      weight stored (N, K), and on sm_90 Mosaic GPU the W8A8 / FP8 Hopper kernels and the Hopper
#      W4A16 kernel; the W4A16 options unpack=asm, swap_ab),
#   2. the benchmark (second, since it measures what the goals are about; it judges them too) on
#      the four shapes of the earlier H100 runs (7b.qkv, 7b.down, 70b.gate_up, 70b.down),
#      M = 1..4096: bf16, w4a16 and w4a16-swap (swap_ab), w8a8 / fp8 and w8a8-nk / fp8-nk (the
#      weight (N, K)), w8a8-xla / fp8-xla (XLA's native int8 / fp8 dot, what kernels="xla" serving
#      runs), w8a8-split1 / fp8-split1 at M <= 16 (K in one range, beside the default's split);
#      w8a8+quant is left to the full sweep, `python -m experiments.kernels.bench` alone,
#   3. the Hopper rows (Pallas on Mosaic GPU: w8a8-mgpu, fp8-mgpu, w4a16-mgpu at M <= 128) beside
#      bf16 on the same shapes, in a process of their own, so that a kernel that takes the CUDA
#      context down cannot cost the results of step 2,
#   4. at M = 4096 (K = N = 4096): XLA's bf16 matmul, XLA's native int8 / fp8 dot with the weight
#      stored (K, N) and stored (N, K), then the Triton W8A8 / FP8 block candidates with the weight
#      (N, K) (the K-major operand of wgmma, which the table's blocks were not tuned for) and the
#      Hopper path's tile configs,
#   5. where W4A16's time goes at M = 1 and 16 (experiments.kernels.profile_w4a16: the kernel's loads alone,
#      loads + unpack, the kernel, one-change variants: split_k=1, swap_ab, unpack, blocks, warps,
#      stages; and the Hopper W4A16 kernel) on 7b.qkv and 7b.down,
#   6. the goals judged on the benchmark's two results files pooled (experiments.kernels.goals: the
#      Mosaic GPU rows of step 3 beside the Triton and XLA rows of step 2; no device work).
# Results go to $OUT (the device tool's folder) or runs/device_kernels: device.txt, check.json,
# check.log, bench.json, bench.md, bench.log, bench_mgpu.json, bench_mgpu.md, bench_mgpu.log,
# tune.log, profile.json, profile.log, goals.md, goals.json, goals.log. Run from the
# repository root:
#   bash scripts/device_kernels.sh
out_default=runs/device_kernels
source "$(dirname "$0")/device_env.sh"
timeout 120 "$py" -m experiments.kernels.check --time-budget-s 100 --out "$out/check.json" 2>&1 |
  tee "$out/check.log"
timeout 160 "$py" -m experiments.kernels.bench --shapes 7b.qkv,7b.down,70b.gate_up,70b.down \
  --kernels bf16,w4a16,w4a16-swap,w8a8,w8a8-nk,fp8,fp8-nk,w8a8-xla,fp8-xla,w8a8-split1,fp8-split1 \
  --time-budget-s 135 --out "$out/bench.json" --md "$out/bench.md" 2>&1 |
  tee "$out/bench.log"
timeout 70 "$py" -m experiments.kernels.bench --shapes 7b.qkv,7b.down,70b.gate_up,70b.down \
  --kernels bf16,w8a8-mgpu,fp8-mgpu,w4a16-mgpu \
  --time-budget-s 50 --out "$out/bench_mgpu.json" --md "$out/bench_mgpu.md" 2>&1 |
  tee "$out/bench_mgpu.log"
timeout 100 "$py" -m experiments.kernels.tune --m 4096 \
  --kernels bf16,w8a8-xla,fp8-xla,w8a8-nk,fp8-nk,w8a8-mgpu,fp8-mgpu 2>&1 | tee "$out/tune.log"
timeout 70 "$py" -m experiments.kernels.profile_w4a16 --shapes 7b.qkv,7b.down --m 1,16 --time-budget-s 55 \
  --out "$out/profile.json" 2>&1 | tee "$out/profile.log"
timeout 10 "$py" -m experiments.kernels.goals "$out/bench.json" "$out/bench_mgpu.json" --skip-missing \
  --md "$out/goals.md" --json "$out/goals.json" 2>&1 | tee "$out/goals.log"
