"""experiments.kernels.bench.rows: each row computes the matmul it names (the experimental rows
calling the experimental kernels by name)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.kernels.bench.accounting import activation_bytes, nominal_weight_bytes
from experiments.kernels.bench.cli import make_config, parse_args
from experiments.kernels.bench.data import make_activations, make_weights
from experiments.kernels.bench.programs import build_program
from experiments.kernels.bench.rows import (
    ACT_FAMILY,
    ARITHMETIC,
    HOPPER_KERNELS,
    MAX_M,
    MODULES,
    WEIGHT_FAMILY,
    kernel_fn,
)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("base", ["w8a8", "fp8"])
def test_nk_rows_compute_the_same_matmul(base, backend):
    """``-nk`` rows: the same weight values stored (N, K), the same outputs."""
    k, n, m = 256, 384, 16
    key = jax.random.key(3)
    family = WEIGHT_FAMILY[base]
    w, w_nk = make_weights(family, key, k, n), make_weights(family + "-nk", key, k, n)
    assert w_nk[0].shape == (n, k) and bool((w_nk[0] == w[0].T).all())
    x = make_activations(ACT_FAMILY[base], jax.random.key(4), m, k)
    y, y_nk = kernel_fn(base, backend)(x, w), kernel_fn(base + "-nk", backend)(x, w_nk)
    assert y.shape == y_nk.shape == (m, n)
    scale = float(jnp.max(jnp.abs(y.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs((y - y_nk).astype(jnp.float32)))) <= 1e-2 * scale  # bf16 outputs
    assert nominal_weight_bytes(base + "-nk", k, n) == nominal_weight_bytes(base, k, n)
    assert activation_bytes(base + "-nk", m, k) == activation_bytes(base, m, k)


@pytest.mark.parametrize("base", ["w8a8", "fp8"])
def test_split1_rows_call_one_k_range(base, monkeypatch):
    """``-split1`` rows pass ``split_k=1`` to the kernel (none to the reference), on the same operands."""
    import qjax.kernels.fp8 as fp8_mod
    import qjax.kernels.w8a8 as w8a8_mod

    mod, name = (w8a8_mod, "w8a8_matmul") if base == "w8a8" else (fp8_mod, "fp8_matmul")
    seen = []
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    k, n, m = 256, 128, 16
    w = make_weights(WEIGHT_FAMILY[base], jax.random.key(5), k, n)
    x = make_activations(ACT_FAMILY[base], jax.random.key(6), m, k)
    y = kernel_fn(base, "interpret")(x, w)
    y1 = kernel_fn(base + "-split1", "interpret")(x, w)
    assert [kw.get("split_k") for kw in seen] == [None, 1]
    assert WEIGHT_FAMILY[base + "-split1"] == WEIGHT_FAMILY[base] and MAX_M[base + "-split1"] == 16
    np.testing.assert_array_equal(
        np.asarray(y1, np.float32), np.asarray(y, np.float32)
    )  # one range either way
    ref = kernel_fn(base, "reference")(x, w)  # the references take no split_k
    np.testing.assert_array_equal(
        np.asarray(kernel_fn(base + "-split1", "reference")(x, w), np.float32), np.asarray(ref, np.float32)
    )


@pytest.mark.parametrize("kernel", ["w8a8-xla", "fp8-xla"])
def test_xla_rows_compute_the_scaled_low_precision_product(kernel):
    """``w8a8-xla`` / ``fp8-xla`` (XLA's int8 / fp8 dot, the same on every backend) on the operands of
    ``w8a8`` / ``fp8``: ``x_scale * w_scale * (x_q @ w_q)`` in float64 (the int8 product exact, the
    e4m3 values upcast), within the bf16 rounding of the output and the f32 accumulation of fp8."""
    k, n, m = 256, 384, 16
    base = kernel.removesuffix("-xla")
    w_q, w_scale = make_weights(WEIGHT_FAMILY[kernel], jax.random.key(7), k, n)
    x_q, x_scale = make_activations(ACT_FAMILY[kernel], jax.random.key(8), m, k)
    assert (WEIGHT_FAMILY[kernel], ACT_FAMILY[kernel]) == (WEIGHT_FAMILY[base], ACT_FAMILY[base])
    assert w_q.shape == (k, n) and w_scale.shape == (1, n) and x_scale.shape == (m, 1)
    y = kernel_fn(kernel, "reference")((x_q, x_scale), (w_q, w_scale))
    assert y.dtype == jnp.bfloat16 and y.shape == (m, n)
    if base == "w8a8":
        product = (np.asarray(x_q, np.int64) @ np.asarray(w_q, np.int64)).astype(np.float64)
    else:
        product = np.asarray(x_q).astype(np.float64) @ np.asarray(w_q).astype(np.float64)
    scales = np.asarray(x_scale, np.float64) * np.asarray(w_scale, np.float64)
    want = scales * product
    magnitude = scales * (
        np.abs(np.asarray(x_q).astype(np.float64)) @ np.abs(np.asarray(w_q).astype(np.float64))
    )
    bound = 2.0**-8 * np.abs(want) + (k + 3) * 2.0**-24 * magnitude  # bf16 output; f32 sums and scaling
    err = np.abs(np.asarray(y, np.float64) - want)
    assert np.all(err <= bound), float(np.max(err - bound))
    assert float(np.max(np.abs(want))) > 0.1  # not a trivially small output
    assert kernel_fn(kernel, "gpu")((x_q, x_scale), (w_q, w_scale)).dtype == jnp.bfloat16  # XLA anywhere
    assert nominal_weight_bytes(kernel, k, n) == nominal_weight_bytes(base, k, n)
    assert activation_bytes(kernel, m, k) == activation_bytes(base, m, k) == m * k + 4 * m
    assert ARITHMETIC[kernel] == ARITHMETIC[base] and MODULES[kernel] == ("xla",)


@pytest.mark.parametrize("kernel", HOPPER_KERNELS)
def test_mosaic_gpu_programs_lower_for_cuda(kernel, lowered):
    k, n, m = 512, 384, 64
    weights = [make_weights(WEIGHT_FAMILY[kernel], jax.random.key(r), k, n) for r in range(2)]
    x = make_activations(ACT_FAMILY[kernel], jax.random.key(9), m, k)
    # (N, K), N padded to the CTA tile (256 or 128 columns; K to 8 groups of 128 for int4 weights)
    assert weights[0][0].shape == ((384, 1024) if kernel == "w4a16-mgpu" else (512, 512))
    program = jax.jit(build_program(kernel_fn(kernel, "gpu")))
    assert "mosaic_gpu" in lowered(program, x, *weights, platform="cuda")


def test_w4a16_swap_row():
    """``w4a16-swap`` computes the ``w4a16`` matmul with swapped tiles; TPU runs skip it."""
    k, n, m = 256, 256, 16
    w = make_weights("w4", jax.random.key(5), k, n)
    x = make_activations("bf16", jax.random.key(6), m, k)
    y, y_swap = kernel_fn("w4a16", "interpret")(x, w), kernel_fn("w4a16-swap", "interpret")(x, w)
    scale = float(jnp.max(jnp.abs(y.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs((y - y_swap).astype(jnp.float32)))) <= 1e-2 * scale  # bf16 outputs
    assert nominal_weight_bytes("w4a16-swap", k, n) == nominal_weight_bytes("w4a16", k, n)
    config = make_config(parse_args(["--backend", "tpu", "--kernels", "w4a16,w4a16-swap"]))
    assert config.kernels == ("bf16", "w4a16")
    assert config.skipped == ("w4a16-swap (swap_ab: an option of the GPU kernel)",)
