"""W8A8 and FP8 with the weight stored ``(N, K)`` (``w_layout="nk"``, K contiguous: the operand
Hopper's 8-bit tensor cores read): the same results as ``(K, N)``, exact where the arithmetic is
exact, both bodies, the references, the Hopper path's weight, refusals and lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels import hopper
from qjax.kernels.fp8 import fp8_matmul, fp8_matmul_reference
from qjax.kernels.w8a8 import (
    _check_w8a8,
    _scaled_matmul,
    int8_matmul,
    int8_matmul_reference,
    w8a8_matmul,
    w8a8_matmul_reference,
)

FP8 = jnp.float8_e4m3fn
EPS32 = float(np.finfo(np.float32).eps)
SHAPES = [(1, 100, 37), (33, 130, 200)]


def _int8(rng, shape):
    return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_int8_nk_is_exact(shape, seed):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
    exact = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
    wt = w.T  # (N, K)
    nk = functools.partial(int8_matmul, w_layout="nk")
    np.testing.assert_array_equal(np.asarray(jax.jit(nk)(x, wt)), exact)
    np.testing.assert_array_equal(np.asarray(int8_matmul_reference(x, wt, w_layout="nk")), exact)


@pytest.mark.parametrize("body", ["gpu", "tpu"])
def test_w8a8_nk_equals_kn_with_the_full_epilogue(body):
    m, k, n = 33, 130, 200
    rng = np.random.default_rng(7)
    x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
    xs = jnp.asarray(rng.uniform(1e-3, 1e-1, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1e-1, (1, n)), jnp.float32)
    zp = jnp.asarray(rng.integers(-128, 128, (m, 1)), jnp.int32)
    b = jnp.asarray(rng.normal(size=n), jnp.float32)
    outs = []
    for layout, wl in (("kn", w), ("nk", w.T)):
        xq, wq, epi, dt = _check_w8a8(x, xs, wl, ws, zp, b, jnp.float32, layout)
        kw = dict(kernel="w8a8", acc_dtype=jnp.int32, out_dtype=dt, blocks=None, backend="interpret")
        outs.append(_scaled_matmul(xq, wq, epi, body=body, w_layout=layout, **kw))
    # int32 accumulation is exact and the epilogue the same: bit for bit
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    kw = dict(x_zero_point=zp, bias=b, out_dtype=jnp.float32)
    ref = w8a8_matmul_reference(x, xs, w, ws, **kw)
    np.testing.assert_array_equal(np.asarray(w8a8_matmul_reference(x, xs, w.T, ws, w_layout="nk", **kw)), ref)
    y = w8a8_matmul(x, xs, w.T, ws, w_layout="nk", **kw)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=4 * EPS32, atol=1e-6)


def test_fp8_nk_matches_float64():
    m, k, n = 33, 130, 200
    rng = np.random.default_rng(8)
    x = jnp.asarray(np.clip(rng.normal(size=(m, k)) * 8, -448, 448), FP8)
    w = jnp.asarray(np.clip(rng.normal(size=(k, n)), -448, 448), FP8)
    xs = jnp.asarray(rng.uniform(1e-3, 1.0, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1.0, (1, n)), jnp.float32)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    s = np.asarray(xs, np.float64) * np.asarray(ws, np.float64)
    y64, terms = (x64 @ w64) * s, (np.abs(x64) @ np.abs(w64)) * s
    tol = (k + 3) * EPS32 * terms + 1e-30  # k exact products summed in float32, any order
    for y in (
        fp8_matmul(x, xs, w.T, ws, out_dtype=jnp.float32, w_layout="nk"),
        fp8_matmul_reference(x, xs, w.T, ws, out_dtype=jnp.float32, w_layout="nk"),
    ):
        assert np.all(np.abs(np.asarray(y, np.float64) - y64) <= tol)


def test_hopper_weight_from_either_layout():
    w = _int8(np.random.default_rng(9), (300, 200))
    np.testing.assert_array_equal(
        np.asarray(hopper.prepare_weight(w.T, w_layout="nk")), np.asarray(hopper.prepare_weight(w))
    )


_X = jnp.zeros((4, 64), jnp.int8)
_XS = jnp.ones((4, 1), jnp.float32)
_WS = jnp.ones((1, 32), jnp.float32)


@pytest.mark.parametrize(
    ("w", "layout", "match"),
    [
        (jnp.zeros((32, 64), jnp.int8), "kk", r"w_layout='kk': expected 'kn' .* or 'nk'"),
        (jnp.zeros((64, 32), jnp.int8), "nk", r"w_q has 32 columns .*must be \(N, K\).*w_layout='kn'"),
        (jnp.zeros((32, 64), jnp.int8), "kn", r"w_q has 32 rows .*must be \(K, N\).*w_layout='nk'"),
        (jnp.zeros((33, 64), jnp.int8), "nk", r"w_scale has shape \(1, 32\)"),  # N read from axis 0
    ],
)
def test_refusals_name_the_layout(w, layout, match):
    with pytest.raises(ValueError, match=match):
        w8a8_matmul(_X, _XS, w, _WS, w_layout=layout)


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize(("backend", "platform"), [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.int8, FP8], ids=["int8", "fp8"])
def test_nk_lowers_for_accelerators(dtype, backend, platform, m, lowered):
    k, n = 512, 384
    s = jax.ShapeDtypeStruct
    matmul = w8a8_matmul if dtype == jnp.int8 else fp8_matmul
    f = functools.partial(matmul, backend=backend, w_layout="nk")
    args = (s((m, k), dtype), s((m, 1), jnp.float32), s((n, k), dtype), s((1, n), jnp.float32))
    assert lowered(jax.jit(f), *args, bias=s((n,), jnp.float32), platform=platform)
