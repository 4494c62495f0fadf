"""FP8 Pallas kernel (``qjax.kernels.fp8``): e4m3 x e4m3 with float32 accumulation matches the
reference within float32 rounding of the sums, the reference matches float64 numpy on the
dequantized operands, bad inputs are refused by name, and both accelerators' lowerings build.

On CPU the kernel runs in the Pallas interpreter; on a GPU machine the same tests run Triton.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.fp8 import fp8_matmul, fp8_matmul_reference

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
EPS32 = float(np.finfo(np.float32).eps)
SHAPES = [(1, 100, 37), (33, 130, 200), (64, 256, 384)]


def _fp8_values(rng: np.random.Generator, shape: tuple[int, ...], log2_scale: int) -> jax.Array:
    v = rng.normal(size=shape) * 2.0**log2_scale
    return jnp.asarray(np.clip(v, -FP8_MAX, FP8_MAX), FP8)  # e4m3fn overflows to NaN: clip first


def _float64(x, xs, w, ws, b):
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    s = np.asarray(xs, np.float64) * np.asarray(ws, np.float64)
    y = (x64 @ w64) * s
    terms = (np.abs(x64) @ np.abs(w64)) * s
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :]
        terms = terms + np.abs(np.asarray(b, np.float64))[None, :]
    return y, terms


def _check_close(y, y_ref, terms, k, out_dtype):
    out_eps = EPS32 if out_dtype == jnp.float32 else float(jnp.finfo(out_dtype).eps)
    # Sums of k exact products in float32, any order: error <= (k + 3) eps sum|terms|.
    tol = (k + 3) * EPS32 * terms + out_eps * np.abs(y_ref) + 1e-30
    err = np.abs(np.asarray(y, np.float64) - np.asarray(y_ref, np.float64))
    assert np.all(err <= tol), float(np.max(err / tol))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log2_scale=st.integers(-8, 8))
def test_fp8_matches_reference_and_float64(shape, seed, log2_scale):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x, w = _fp8_values(rng, (m, k), log2_scale), _fp8_values(rng, (k, n), 0)
    xs = jnp.asarray(rng.uniform(1e-3, 1.0, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1.0, (1, n)), jnp.float32)
    f = functools.partial(fp8_matmul, out_dtype=jnp.float32)
    y = jax.jit(f)(x, xs, w, ws)
    yr = jax.jit(functools.partial(fp8_matmul_reference, out_dtype=jnp.float32))(x, xs, w, ws)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    y64, terms = _float64(x, xs, w, ws, None)
    _check_close(yr, y64, terms, k, jnp.float32)
    _check_close(y, yr, terms, k, jnp.float32)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_token", "per_tensor"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fp8_epilogues(out_dtype, per_tensor, bias):
    m, k, n = 33, 130, 200
    rng = np.random.default_rng(7)
    x, w = _fp8_values(rng, (m, k), 2), _fp8_values(rng, (k, n), 0)
    xs = jnp.asarray(rng.uniform(1e-2, 1.0, (1, 1) if per_tensor else (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-2, 1.0, (1, 1) if per_tensor else (1, n)), jnp.float32)
    b = jnp.asarray(rng.normal(size=n), jnp.float32) if bias else None
    kw = dict(bias=b, out_dtype=out_dtype)
    y = jax.jit(functools.partial(fp8_matmul, **kw))(x, xs, w, ws)
    yr = jax.jit(functools.partial(fp8_matmul_reference, **kw))(x, xs, w, ws)
    assert y.dtype == out_dtype
    y64, terms = _float64(x, xs, w, ws, b)
    _check_close(yr, y64, terms, k, out_dtype)
    _check_close(y, yr, terms, k, out_dtype)


def test_fp8_tpu_body_interpreted():
    """The TPU body upcasts each tile to bf16 (exact for e4m3) before the dot."""
    m, k, n = 33, 300, 200
    rng = np.random.default_rng(8)
    x, w = _fp8_values(rng, (m, k), 3), _fp8_values(rng, (k, n), -2)
    xs = jnp.asarray(rng.uniform(1e-2, 1.0, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-2, 1.0, (1, n)), jnp.float32)
    y = fp8_matmul(x, xs, w, ws, out_dtype=jnp.float32, backend="interpret", body="tpu")
    y64, terms = _float64(x, xs, w, ws, None)
    _check_close(y, y64, terms, k, jnp.float32)


_X = jnp.zeros((4, 64), FP8)
_W = jnp.zeros((64, 32), FP8)
_XS = jnp.ones((4, 1), jnp.float32)
_WS = jnp.ones((1, 32), jnp.float32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(x_q=_X.astype(jnp.bfloat16)), TypeError, r"x_q has dtype bfloat16, expected float8_e4m3fn"),
        (
            dict(w_q=_W.astype(jnp.float8_e5m2)),
            TypeError,
            r"w_q has dtype float8_e5m2, expected float8_e4m3fn",
        ),
        (dict(x_q=jnp.zeros((64,), FP8)), ValueError, r"x_q has shape \(64,\) \(rank 1\)"),
        (dict(w_q=jnp.zeros((32, 64), FP8)), ValueError, r"x_q has K=64 columns but w_q has 32 rows"),
        (dict(x_scale=jnp.ones((1, 4), jnp.float32)), ValueError, r"x_scale has shape \(1, 4\)"),
        (dict(w_scale=jnp.ones((32,), jnp.float32)), ValueError, r"w_scale has shape \(32,\)"),
        (dict(bias=jnp.zeros((1, 32), jnp.float32)), ValueError, r"bias has shape \(1, 32\)"),
        (dict(out_dtype=jnp.float8_e4m3fn), ValueError, r"out_dtype=float8_e4m3fn"),
    ],
)
def test_fp8_refuses_bad_inputs(kwargs, exc, match):
    args = dict(x_q=_X, x_scale=_XS, w_q=_W, w_scale=_WS) | kwargs
    with pytest.raises(exc, match=match):
        fp8_matmul(**args)


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("backend, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_accelerators(backend, platform, m, lowered):
    k, n = 512, 256
    args = (
        jax.ShapeDtypeStruct((m, k), FP8),
        jax.ShapeDtypeStruct((m, 1), jnp.float32),
        jax.ShapeDtypeStruct((k, n), FP8),
        jax.ShapeDtypeStruct((1, n), jnp.float32),
    )
    b = jax.ShapeDtypeStruct((n,), jnp.float32)
    f = functools.partial(fp8_matmul, backend=backend)
    text = lowered(jax.jit(f), *args, bias=b, platform=platform)
    assert "qjax_fp8" in text
