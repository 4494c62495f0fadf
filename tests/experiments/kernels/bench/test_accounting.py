"""experiments.kernels.bench.accounting: byte and FLOP accounting by hand, the roofline and device
table, the crossover M."""

from __future__ import annotations

import jax
import pytest

from experiments.kernels.bench.accounting import (
    crossover,
    device_peaks,
    matmul_flops,
    nominal_weight_bytes,
    roofline_seconds,
    traffic_bytes,
)
from experiments.kernels.bench.data import make_weights, tree_nbytes

H100 = device_peaks("NVIDIA H100 80GB HBM3")


def test_w4a16_accounting_by_hand():
    m, k, n = 1, 4096, 4096
    weights = k * n // 2  # two int4 codes per byte
    scales = (k // 128) * n * 4  # f32 scale per group of 128 rows and column
    assert nominal_weight_bytes("w4a16", k, n, group_size=128, scale_itemsize=4) == weights + scales
    assert weights + scales == 8_388_608 + 524_288
    # the packed weight the benchmark makes has exactly that size (no padding at this shape)
    packed = jax.eval_shape(lambda key: make_weights("w4", key, k, n), jax.random.key(0))
    assert tree_nbytes(packed) == weights + scales
    activations, output = m * k * 2, m * n * 2
    total = traffic_bytes("w4a16", m, k, n, weights + scales)
    assert total == activations + weights + scales + output == 8_929_280
    assert matmul_flops(m, k, n) == 33_554_432
    # at M = 1 the roofline is the memory bound: bytes / 3.35 TB/s
    assert roofline_seconds("w4a16", 33_554_432, total, H100) == pytest.approx(total / 3.35e12)


def test_other_kernels_accounting_by_hand():
    m, k, n = 16, 4096, 4096
    assert nominal_weight_bytes("bf16", k, n) == 2 * k * n
    assert nominal_weight_bytes("w8a8", k, n) == k * n + 4 * n
    assert nominal_weight_bytes("fp8", k, n) == k * n + 4 * n
    assert nominal_weight_bytes("w4a16", k, n, zeros=True) == k * n // 2 + 2 * 32 * n * 4
    assert traffic_bytes("bf16", m, k, n, 2 * k * n) == 2 * m * k + 2 * k * n + 2 * m * n
    assert traffic_bytes("w8a8", m, k, n, k * n + 4 * n) == (m * k + 4 * m) + (k * n + 4 * n) + 2 * m * n
    assert traffic_bytes("fp8", m, k, n, k * n + 4 * n) == traffic_bytes("w8a8", m, k, n, k * n + 4 * n)
    # +quant: read bf16 x, write int8 x and scales, read them back in the matmul
    quant = traffic_bytes("w8a8+quant", m, k, n, k * n + 4 * n)
    assert quant == 2 * m * k + 2 * (m * k + 4 * m) + (k * n + 4 * n) + 2 * m * n
    for family in ("bf16", "int8", "fp8"):
        w = jax.eval_shape(lambda key, f=family: make_weights(f, key, k, n), jax.random.key(0))
        kernel = {"bf16": "bf16", "int8": "w8a8", "fp8": "fp8"}[family]
        assert tree_nbytes(w) == nominal_weight_bytes(kernel, k, n)


def test_roofline_and_device_table():
    assert H100 is not None and H100.bandwidth == 3.35e12
    h200 = device_peaks("NVIDIA H200")
    assert h200 is not None and h200.bandwidth == 4.8e12 and h200.flops["bf16"] == 989e12
    for kind in ("cpu", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB"):
        assert device_peaks(kind) is None
    assert roofline_seconds("bf16", 10**15, 10**9, None) is None
    # M = 4096, 8192 x 8192: compute bound; int8 runs against the int8 peak, w4a16 against bf16's
    m, k, n = 4096, 8192, 8192
    flops = matmul_flops(m, k, n)
    nbytes = traffic_bytes("w8a8", m, k, n, k * n + 4 * n)
    assert roofline_seconds("w8a8", flops, nbytes, H100) == pytest.approx(flops / 1979e12)
    assert roofline_seconds("w4a16", flops, nbytes, H100) == pytest.approx(flops / 989e12)


def test_crossover_on_synthetic_speedups():
    assert crossover({1: 3.0, 16: 2.5, 64: 1.4, 256: 0.9, 1024: 0.6, 4096: 0.5}) == 256
    assert crossover({4096: 0.5, 1: 3.0, 1024: 1.2, 256: 0.99}) == 256  # unordered input
    assert crossover({1: 3.0, 16: 1.01}) == "none"
    assert crossover({1: 0.8, 16: 1.2}) == 1  # smallest M that loses, even if a larger M wins
    assert crossover({1: None, 16: 1.5, 64: None}) == "none"  # unmeasured cells are skipped
    assert crossover({1: None}) == "-"
