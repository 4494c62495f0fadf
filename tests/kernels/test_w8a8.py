"""W8A8 Pallas kernel (``qjax.kernels.w8a8``): the raw int32 accumulator is exact, the fused
epilogue matches the reference within float32 rounding, the reference matches a float64 numpy
computation of the formula, bad inputs are refused by name, and both accelerators' lowerings build.

On CPU the kernels run in the Pallas interpreter (``backend=None`` resolves to ``"interpret"``);
on a GPU machine the same tests run the Triton kernel. Shapes are fixed (each compiles once);
hypothesis draws the values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.w8a8 import (
    int8_matmul,
    int8_matmul_reference,
    w8a8_matmul,
    w8a8_matmul_reference,
)

SHAPES = [(1, 100, 37), (33, 130, 200), (64, 256, 384)]
EPS32 = float(np.finfo(np.float32).eps)

_int8 = jax.jit(int8_matmul)
_int8_tpu_body = jax.jit(functools.partial(int8_matmul, backend="interpret", body="tpu"))
_int8_ref = jax.jit(int8_matmul_reference)


def _int8_values(rng: np.random.Generator, shape: tuple[int, ...], mode: str) -> jax.Array:
    if mode == "uniform":
        v = rng.integers(-128, 128, shape)
    elif mode == "extremes":  # worst case for overflow and sign handling
        v = rng.choice(np.array([-128, 127]), shape)
    else:  # sparse
        v = rng.integers(-128, 128, shape) * (rng.random(shape) < 0.1)
    return jnp.asarray(v, jnp.int8)


MODES = st.sampled_from(["uniform", "extremes", "sparse"])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), mode=MODES)
def test_int8_matmul_exact(shape, seed, mode):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x, w = _int8_values(rng, (m, k), mode), _int8_values(rng, (k, n), mode)
    ref = np.asarray(_int8_ref(x, w))
    np.testing.assert_array_equal(np.asarray(x, np.int64) @ np.asarray(w, np.int64), ref)
    out = _int8(x, w)
    assert out.dtype == jnp.int32 and out.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_matmul_tpu_body_interpreted(shape):
    m, k, n = shape
    rng = np.random.default_rng(1)
    x, w = _int8_values(rng, (m, k), "uniform"), _int8_values(rng, (k, n), "uniform")
    np.testing.assert_array_equal(np.asarray(_int8_tpu_body(x, w)), np.asarray(_int8_ref(x, w)))


def test_int8_matmul_blocks_override():
    rng = np.random.default_rng(2)
    x, w = _int8_values(rng, (40, 300), "uniform"), _int8_values(rng, (300, 50), "uniform")
    out = int8_matmul(x, w, blocks={"block_m": 16, "block_n": 32, "block_k": 64})
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_int8_ref(x, w)))


def _operands(rng, m, k, n, *, per_token, zero_point, bias):
    x = _int8_values(rng, (m, k), "uniform")
    w = _int8_values(rng, (k, n), "uniform")
    xs = jnp.asarray(rng.uniform(1e-3, 1e-1, (m, 1) if per_token else (1, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1e-1, (1, n)), jnp.float32)
    zp = jnp.asarray(rng.integers(-128, 128, xs.shape), jnp.int32) if zero_point else None
    b = jnp.asarray(rng.normal(size=n), jnp.float32) if bias else None
    return x, xs, w, ws, zp, b


def _float64_formula(x, xs, w, ws, zp, b):
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    acc = x64 @ w64
    if zp is not None:
        acc = acc - np.asarray(zp, np.float64) * w64.sum(axis=0, keepdims=True)
    terms = np.abs(acc) * np.asarray(xs, np.float64) * np.asarray(ws, np.float64)
    y = acc * np.asarray(xs, np.float64) * np.asarray(ws, np.float64)
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :]
        terms = terms + np.abs(np.asarray(b, np.float64))[None, :]
    return y, terms


EPILOGUES = [
    dict(per_token=True, zero_point=False, bias=False),
    dict(per_token=True, zero_point=True, bias=True),
    dict(per_token=False, zero_point=False, bias=True),
    dict(per_token=False, zero_point=True, bias=False),
]


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: "-".join(k for k, v in e.items() if v) or "plain")
@pytest.mark.parametrize("shape", [(1, 100, 37), (33, 130, 200)], ids=lambda s: "x".join(map(str, s)))
def test_w8a8_matches_reference_and_formula(shape, epi, out_dtype):
    m, k, n = shape
    x, xs, w, ws, zp, b = _operands(np.random.default_rng(3), m, k, n, **epi)
    kw = dict(x_zero_point=zp, bias=b, out_dtype=out_dtype)
    y = jax.jit(functools.partial(w8a8_matmul, **kw))(x, xs, w, ws)
    yr = jax.jit(functools.partial(w8a8_matmul_reference, **kw))(x, xs, w, ws)
    assert y.dtype == out_dtype and y.shape == (m, n)
    y, yr = np.asarray(y, np.float64), np.asarray(yr, np.float64)
    y64, terms = _float64_formula(x, xs, w, ws, zp, b)
    # The reference is the formula up to float32 rounding: the int32 -> f32 conversion, two
    # products and the bias add, each at most half an ulp of the running magnitude.
    out_eps = EPS32 if out_dtype == jnp.float32 else float(jnp.finfo(jnp.bfloat16).eps)
    bound = 4 * EPS32 * terms + out_eps * np.abs(y64) + 1e-30
    assert np.all(np.abs(yr - y64) <= bound), np.max(np.abs(yr - y64) / bound)
    # The kernel runs the same arithmetic; it may contract or reorder the epilogue (FMA), and the
    # output rounding may then land on a neighbour.
    tol = 4 * EPS32 * terms + 2 * out_eps * np.abs(yr) + 1e-30
    assert np.all(np.abs(y - yr) <= tol), np.max(np.abs(y - yr) / tol)


def test_w8a8_tpu_body_interpreted():
    m, k, n = 33, 130, 200
    x, xs, w, ws, zp, b = _operands(
        np.random.default_rng(4), m, k, n, per_token=True, zero_point=True, bias=True
    )
    kw = dict(x_zero_point=zp, bias=b, out_dtype=jnp.float32)
    y = w8a8_matmul(x, xs, w, ws, backend="interpret", body="tpu", **kw)
    yr = w8a8_matmul_reference(x, xs, w, ws, x_zero_point=zp, bias=b, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(yr), rtol=4 * EPS32, atol=1e-6)


def test_w8a8_zero_point_zero_equals_symmetric():
    x, xs, w, ws, _, b = _operands(
        np.random.default_rng(5), 8, 64, 32, per_token=True, zero_point=False, bias=True
    )
    zp = jnp.zeros((8, 1), jnp.int32)
    a = w8a8_matmul(x, xs, w, ws, bias=b, out_dtype=jnp.float32)
    c = w8a8_matmul(x, xs, w, ws, x_zero_point=zp, bias=b, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


_X = jnp.zeros((4, 64), jnp.int8)
_W = jnp.zeros((64, 32), jnp.int8)
_XS = jnp.ones((4, 1), jnp.float32)
_WS = jnp.ones((1, 32), jnp.float32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x_q=_X.astype(jnp.float32)), TypeError, r"x_q has dtype float32, expected int8"),
        (dict(x_q=jnp.zeros((2, 4, 64), jnp.int8)), ValueError, r"x_q has shape \(2, 4, 64\) \(rank 3\)"),
        (dict(w_q=jnp.zeros((63, 32), jnp.int8)), ValueError, r"x_q has K=64 columns but w_q has 63 rows"),
        (dict(w_q=jnp.zeros((64, 32), jnp.uint8)), TypeError, r"w_q has dtype uint8, expected int8"),
        (dict(x_scale=jnp.ones((4,), jnp.float32)), ValueError, r"x_scale has shape \(4,\); expected"),
        (dict(x_scale=jnp.ones((4, 1), jnp.int32)), TypeError, r"x_scale must be a float32 array"),
        (dict(w_scale=jnp.ones((32, 1), jnp.float32)), ValueError, r"w_scale has shape \(32, 1\)"),
        (dict(x_zero_point=jnp.zeros((1, 1), jnp.int32)), ValueError, r"x_zero_point has shape \(1, 1\)"),
        (dict(x_zero_point=jnp.zeros((4, 1), jnp.float32)), TypeError, r"x_zero_point must be an int32"),
        (
            dict(bias=jnp.zeros((31,), jnp.float32)),
            ValueError,
            r"bias has shape \(31,\), expected \(N,\) = \(32,\)",
        ),
        (dict(out_dtype=jnp.int32), ValueError, r"out_dtype=int32"),
        (dict(backend="metal"), ValueError, r"backend='metal'"),
        (dict(backend="gpu", blocks={"block_k": 96}), ValueError, r"blocks.block_k=96: Triton"),
        (dict(backend="tpu", blocks={"block_m": 8}), ValueError, r"block_m a multiple of 32"),
    ],
)
def test_w8a8_refuses_bad_inputs(kwargs, exc, match):
    args = dict(x_q=_X, x_scale=_XS, w_q=_W, w_scale=_WS) | kwargs
    with pytest.raises(exc, match=match):
        w8a8_matmul(**args)


def test_int8_matmul_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"x_q has K=64 columns but w_q has 32 rows"):
        int8_matmul(_X, _W.T)
    with pytest.raises(TypeError, match=r"x_q has dtype int32, expected int8"):
        int8_matmul_reference(_X.astype(jnp.int32), _W)


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("backend, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_accelerators(backend, platform, m, lowered):
    k, n = 512, 256
    x = jax.ShapeDtypeStruct((m, k), jnp.int8)
    w = jax.ShapeDtypeStruct((k, n), jnp.int8)
    xs = jax.ShapeDtypeStruct((m, 1), jnp.float32)
    ws = jax.ShapeDtypeStruct((1, n), jnp.float32)
    zp = jax.ShapeDtypeStruct((m, 1), jnp.int32)
    b = jax.ShapeDtypeStruct((n,), jnp.float32)
    f = functools.partial(w8a8_matmul, backend=backend)
    text = lowered(jax.jit(f), x, xs, w, ws, x_zero_point=zp, bias=b, platform=platform)
    assert "qjax_w8a8" in text
    lowered(jax.jit(functools.partial(int8_matmul, backend=backend)), x, w, platform=platform)
