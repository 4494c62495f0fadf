"""The 8-bit kernels with the weight stored ``(N, K)`` (``qjax.kernels.experimental.nk_layout``, K
contiguous: the operand Hopper's 8-bit tensor cores read): the same results as ``(K, N)``, exact
where the arithmetic is exact, both bodies, the references, the Hopper path's weight, refusals and
lowering. With K split over programs and the tuning candidates: beside the ``(K, N)`` kernels in
``tests/kernels/test_launch.py``, ``test_fp8_block.py`` and ``test_tuning.py``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.experimental import hopper, nk_layout
from qjax.kernels.fp8_block import fp8_block_matmul_reference
from qjax.kernels.w8a8 import w8a8_matmul, w8a8_matmul_reference
from tests.kernels.test_fp8_block import block_float64, block_operands

FP8 = jnp.float8_e4m3fn
EPS32 = float(np.finfo(np.float32).eps)
SHAPES = [(1, 100, 37), (33, 130, 200)]


def _int8(rng, shape):
    return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


def _fp8(rng, shape, scale=1.0):
    return jnp.asarray(np.clip(rng.normal(size=shape) * scale, -448, 448), FP8)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_int8_nk_is_exact(shape, seed):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
    exact = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
    wt = w.T  # (N, K)
    np.testing.assert_array_equal(np.asarray(jax.jit(nk_layout.int8_matmul_nk)(x, wt)), exact)
    np.testing.assert_array_equal(np.asarray(nk_layout.int8_matmul_nk_reference(x, wt)), exact)


@pytest.mark.parametrize("body", ["gpu", "tpu"])
def test_w8a8_nk_equals_kn_with_the_full_epilogue(body):
    m, k, n = 33, 130, 200
    rng = np.random.default_rng(7)
    x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
    xs = jnp.asarray(rng.uniform(1e-3, 1e-1, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1e-1, (1, n)), jnp.float32)
    zp = jnp.asarray(rng.integers(-128, 128, (m, 1)), jnp.int32)
    b = jnp.asarray(rng.normal(size=n), jnp.float32)
    kw = dict(x_zero_point=zp, bias=b, out_dtype=jnp.float32)
    outs = [
        matmul(x, xs, wl, ws, backend="interpret", body=body, **kw)
        for matmul, wl in ((w8a8_matmul, w), (nk_layout.w8a8_matmul_nk, w.T))
    ]
    # int32 accumulation is exact and the epilogue the same: bit for bit
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    ref = w8a8_matmul_reference(x, xs, w, ws, **kw)
    np.testing.assert_array_equal(np.asarray(nk_layout.w8a8_matmul_nk_reference(x, xs, w.T, ws, **kw)), ref)
    y = nk_layout.w8a8_matmul_nk(x, xs, w.T, ws, **kw)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=4 * EPS32, atol=1e-6)


def test_fp8_nk_matches_float64():
    m, k, n = 33, 130, 200
    rng = np.random.default_rng(8)
    x, w = _fp8(rng, (m, k), 8), _fp8(rng, (k, n))
    xs = jnp.asarray(rng.uniform(1e-3, 1.0, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1.0, (1, n)), jnp.float32)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    s = np.asarray(xs, np.float64) * np.asarray(ws, np.float64)
    y64, terms = (x64 @ w64) * s, (np.abs(x64) @ np.abs(w64)) * s
    tol = (k + 3) * EPS32 * terms + 1e-30  # k exact products summed in float32, any order
    for y in (
        nk_layout.fp8_matmul_nk(x, xs, w.T, ws, out_dtype=jnp.float32),
        nk_layout.fp8_matmul_nk_reference(x, xs, w.T, ws, out_dtype=jnp.float32),
    ):
        assert np.all(np.abs(np.asarray(y, np.float64) - y64) <= tol)


def test_hopper_weight_from_either_layout():
    w = _int8(np.random.default_rng(9), (300, 200))
    np.testing.assert_array_equal(
        np.asarray(hopper.prepare_weight(w.T, layout=nk_layout.NK)), np.asarray(hopper.prepare_weight(w))
    )


_X = jnp.zeros((4, 64), jnp.int8)
_XS = jnp.ones((4, 1), jnp.float32)
_WS = jnp.ones((1, 32), jnp.float32)


@pytest.mark.parametrize(
    ("matmul", "w", "match"),
    [
        (
            functools.partial(hopper.w8a8_matmul_hopper, layout=nk_layout.NK),
            jnp.zeros((64, 32), jnp.int8),
            r"w_q has 32 columns .*must be \(N, K\).*main kernels",
        ),
        (
            nk_layout.w8a8_matmul_nk,
            jnp.zeros((64, 32), jnp.int8),
            r"w_q has 32 columns .*must be \(N, K\).*main kernels",
        ),
        (w8a8_matmul, jnp.zeros((32, 64), jnp.int8), r"w_q has 32 rows .*must be \(K, N\).*_nk entries"),
        (
            nk_layout.w8a8_matmul_nk,
            jnp.zeros((33, 64), jnp.int8),
            r"w_scale has shape \(1, 32\)",
        ),  # N from axis 0
    ],
    ids=["hopper-nk", "nk", "kn", "nk-scale"],
)
def test_refusals_name_the_layout(matmul, w, match):
    with pytest.raises(ValueError, match=match):
        matmul(_X, _XS, w, _WS)


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize(("backend", "platform"), [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.int8, FP8], ids=["int8", "fp8"])
def test_nk_lowers_for_accelerators(dtype, backend, platform, m, lowered):
    k, n = 512, 384
    s = jax.ShapeDtypeStruct
    matmul = nk_layout.w8a8_matmul_nk if dtype == jnp.int8 else nk_layout.fp8_matmul_nk
    f = functools.partial(matmul, backend=backend)
    args = (s((m, k), dtype), s((m, 1), jnp.float32), s((n, k), dtype), s((1, n), jnp.float32))
    assert lowered(jax.jit(f), *args, bias=s((n,), jnp.float32), platform=platform)


# ------------------------------------------------------------------------------------------------
# Block-scaled FP8


@pytest.mark.parametrize("body", ["gpu", "tpu"])
def test_fp8_block_weight_stored_nk_gives_the_same_values(body):
    """The weight ``(N, K)`` (K contiguous), block scales unchanged; within the float32 rounding
    bound of the formula, like the ``(K, N)`` kernel, in both bodies."""
    m, k, n = 33, 384, 300
    x, xs, w, ws, bias = block_operands(np.random.default_rng(5), m, k, n, 2)
    y64, terms = block_float64(x, xs, w, ws, bias)
    tol = (128 + xs.shape[1] + 4) * EPS32 * terms + 1e-30
    f = functools.partial(
        nk_layout.fp8_block_matmul_nk, out_dtype=jnp.float32, backend="interpret", body=body
    )
    y = np.asarray(jax.jit(f)(x, xs, w.T, ws, bias=bias), np.float64)
    assert y.shape == (m, n) and np.all(np.abs(y - y64) <= tol)
    ref = nk_layout.fp8_block_matmul_nk_reference(x, xs, w.T, ws, bias=bias, out_dtype=jnp.float32)
    kn_ref = fp8_block_matmul_reference(x, xs, w, ws, bias=bias, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(kn_ref))
    with pytest.raises(ValueError, match=r"w_q has 300 columns .*main kernels"):
        nk_layout.fp8_block_matmul_nk(x, xs, w, ws, backend="interpret")


@pytest.mark.parametrize(("backend", "platform"), [("gpu", "cuda"), ("tpu", "tpu")])
def test_fp8_block_weight_stored_nk_lowers(backend, platform, lowered):
    m, k, n = 64, 1024, 384
    args = (
        jax.ShapeDtypeStruct((m, k), FP8),
        jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
        jax.ShapeDtypeStruct((n, k), FP8),
        jax.ShapeDtypeStruct((k // 128, 3), jnp.float32),
    )
    fn = jax.jit(functools.partial(nk_layout.fp8_block_matmul_nk, backend=backend))
    assert "qjax_fp8_block" in lowered(fn, *args, platform=platform)
