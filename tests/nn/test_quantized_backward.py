"""Quantized backward contractions against a float64 numpy reference of their math, stochastic
rounding's unbiasedness, and the spec's errors."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.nn.quantized_backward import (
    GradientSpec,
    conv_backward,
    dot_backward,
    quantized_backward_dot,
)
from qjax.numerics import SpecError

QMAX = {"int8": 127, "int4": 7}
FP8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


def fake64(x: np.ndarray, dtype: str, scale_axes: tuple[int, ...]) -> np.ndarray:
    """float64 symmetric fake quantization of ``x`` with one scale per index of the axes NOT in
    ``scale_axes`` (``scale_axes``: the axes a scale spans), nearest rounding (half to even)."""
    amax = np.max(np.abs(x), axis=scale_axes, keepdims=True)
    if dtype in FP8:
        fmax = float(ml_dtypes.finfo(FP8[dtype]).max)
        s = np.maximum(amax / fmax, np.finfo(np.float32).tiny)
        return (x / s).astype(np.float32).astype(FP8[dtype]).astype(np.float64) * s
    q = QMAX[dtype]
    s = np.maximum(amax / q, np.finfo(np.float32).tiny)
    return np.clip(np.round(x / s), -q, q) * s


def tiles64(x: np.ndarray, dtype: str, block: int) -> np.ndarray:
    """1 x ``block`` tiles along the last axis (padded with zeros)."""
    k = x.shape[-1]
    pad = -k % block
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    t = xp.reshape(*x.shape[:-1], -1, block)
    return fake64(t, dtype, (t.ndim - 1,)).reshape(xp.shape)[..., :k]


def blocks64(w: np.ndarray, dtype: str, block: int) -> np.ndarray:
    """``block`` x ``block`` blocks of a 2-D array (padded with zeros)."""
    r, c = w.shape
    wp = np.pad(w, [(0, -r % block), (0, -c % block)])
    R, C = wp.shape
    t = wp.reshape(R // block, block, C // block, block)
    return fake64(t, dtype, (1, 3)).reshape(R, C)[:r, :c]


def linear_reference(g, x, w, dtype, rdtype, granularity, block=4):
    """dL/dx = Q(g) Q(w)^T and dL/dW = Q(x)^T Q(g) for y = x w (x: (M, K), w: (K, N))."""
    g, x, w = (np.asarray(a, np.float64) for a in (g, x, w))
    if granularity == "per_tensor":
        gx, wq = fake64(g, dtype, (0, 1)), fake64(w, rdtype, (0, 1))
        gw, xq = gx, fake64(x, rdtype, (0, 1))
    elif granularity == "per_channel":
        gx, wq = fake64(g, dtype, (1,)), fake64(w, rdtype, (1,))  # per token; per input feature
        gw, xq = fake64(g, dtype, (0,)), fake64(x, rdtype, (0,))  # per output feature; per input feature
    else:
        gx, wq = tiles64(g, dtype, block), blocks64(w.T, rdtype, block).T
        gw, xq = tiles64(g.T, dtype, block).T, tiles64(x.T, rdtype, block).T
    return gx @ wq.T, xq.T @ gw


LINEAR_DN = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_block"])
@pytest.mark.parametrize(
    "dtype,rdtype", [("int8", "int8"), ("float8_e5m2", "float8_e4m3fn"), ("float8_e4m3fn", "float8_e4m3fn")]
)
def test_linear_backward_matches_float64(granularity, dtype, rdtype):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (12, 10)) * 3.0
    w = jax.random.normal(k[1], (10, 6)) * 0.2
    g = jax.random.normal(k[2], (12, 6)) * 1e-3
    spec = GradientSpec(dtype=dtype, residual_dtype=rdtype, granularity=granularity, block_size=4)
    dx, dw = jax.jit(lambda g, x, w: dot_backward(g, x, w, LINEAR_DN, spec, None))(g, x, w)
    rx, rw = linear_reference(g, x, w, dtype, rdtype, granularity)
    scale = lambda r: np.max(np.abs(r))
    np.testing.assert_allclose(np.asarray(dx), rx, rtol=0, atol=2e-6 * scale(rx))
    np.testing.assert_allclose(np.asarray(dw), rw, rtol=0, atol=2e-6 * scale(rw))
    # and the quantization did something: not the float gradient
    assert np.max(np.abs(rx - np.asarray(g, np.float64) @ np.asarray(w, np.float64).T)) > 1e-3 * scale(rx)


def test_einsum_with_batch_axes_matches_reference():
    """A batched contraction (heads as batch axes, two contracted axes): the canonical layout must
    give the same as per-tensor fake quantization followed by the float vjp."""
    k = jax.random.split(jax.random.key(1), 3)
    a = jax.random.normal(k[0], (3, 5, 4, 2))  # (h, t, d1, d2)
    b = jax.random.normal(k[1], (3, 2, 4, 7))  # (h, d2, d1, s)
    dn = (((2, 3), (2, 1)), ((0,), (0,)))
    y = jax.lax.dot_general(a, b, dn)
    g = jax.random.normal(k[2], y.shape)
    spec = GradientSpec(dtype="int8", granularity="per_tensor")
    da, db = dot_backward(g, a, b, dn, spec, None)
    q = lambda t: jnp.asarray(fake64(np.asarray(t, np.float64), "int8", tuple(range(t.ndim))), jnp.float32)
    _, vjp_a = jax.vjp(lambda x: jax.lax.dot_general(x, q(b), dn), a)
    _, vjp_b = jax.vjp(lambda w: jax.lax.dot_general(q(a), w, dn), b)
    np.testing.assert_allclose(da, vjp_a(q(g))[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, vjp_b(q(g))[0], rtol=1e-5, atol=1e-5)


def test_only_the_selected_contraction_is_quantized():
    k = jax.random.split(jax.random.key(2), 3)
    x, w, g = (
        jax.random.normal(k[0], (8, 5)),
        jax.random.normal(k[1], (5, 3)),
        jax.random.normal(k[2], (8, 3)),
    )
    spec = GradientSpec(dtype="int4", contractions=["kernel"])
    dx, dw = dot_backward(g, x, w, LINEAR_DN, spec, None)
    np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-6)
    _, rw = linear_reference(g, x, w, "int4", "int4", "per_tensor")
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-5)


def test_conv_backward_per_channel_matches_reference():
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (2, 6, 6, 3))
    w = jax.random.normal(k[1], (3, 3, 3, 4))
    conv = lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    g = jax.random.normal(k[2], conv(x, w).shape)
    spec = GradientSpec(dtype="int8", granularity="per_channel")
    dx, dw = conv_backward(g, x, w, conv, spec, None)
    f = lambda t, axes: jnp.asarray(fake64(np.asarray(t, np.float64), "int8", axes), jnp.float32)
    rx = jax.vjp(lambda a: conv(a, f(w, (0, 1, 3))), x)[1](f(g, (1, 2, 3)))[0]
    rw = jax.vjp(lambda b: conv(f(x, (0, 1, 2)), b), w)[1](f(g, (0, 1, 2)))[0]
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per_block"):
        conv_backward(g, x, w, conv, GradientSpec(granularity="per_block"), None)


def test_custom_vjp_forward_is_the_float_contraction_and_grads_are_quantized():
    k = jax.random.split(jax.random.key(4), 2)
    x, w = jax.random.normal(k[0], (8, 16)), jax.random.normal(k[1], (16, 4))
    spec = GradientSpec(dtype="int8", granularity="per_channel")
    f = lambda x, w: jnp.sum(jnp.sin(quantized_backward_dot(LINEAR_DN, spec, True, x, w, None, None)))
    np.testing.assert_allclose(
        quantized_backward_dot(LINEAR_DN, spec, True, x, w, None, None), x @ w, rtol=1e-6, atol=1e-6
    )
    dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
    g = jnp.cos(x @ w)
    rx, rw = linear_reference(g, x, w, "int8", "int8", "per_channel")
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
    dtype=st.sampled_from(["int4", "float8_e5m2"]),
)
def test_stochastic_gradient_rounding_is_unbiased(seed, magnitude, dtype):
    """E[dL/dx] over stochastic roundings of g equals Q(g)-free g . Q(w)^T: the mean of n draws is
    within 5 standard errors of it, element by element (the residual is rounded to nearest, so the
    target is g @ Q(w)^T; int4 and e5m2 make the rounding noise large)."""
    rng = np.random.default_rng(seed)
    g = jnp.asarray(rng.standard_normal((4, 6)) * magnitude, jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
    spec = GradientSpec(dtype=dtype, residual_dtype="int8", rounding="stochastic", contractions=["input"])
    n = 400
    keys = jax.random.split(jax.random.key(seed), n)
    dxs = np.asarray(_draws(g, x, w, spec, keys), np.float64)
    target = np.asarray(g, np.float64) @ fake64(np.asarray(w, np.float64), "int8", (0, 1)).T
    mean, se = dxs.mean(0), dxs.std(0, ddof=1) / np.sqrt(n)
    tol = 5 * se + 1e-6 * np.max(np.abs(target))
    assert np.all(np.abs(mean - target) <= tol), np.max(np.abs(mean - target) / np.maximum(se, 1e-30))
    # nearest rounding is biased at int4: the same test must fail for it on this tensor
    near = GradientSpec(dtype=dtype, residual_dtype="int8", contractions=["input"])
    dn = np.asarray(dot_backward(g, x, w, LINEAR_DN, near, None)[0], np.float64)
    assert np.any(np.abs(dn - target) > 5 * se + 1e-6 * np.max(np.abs(target)))


@functools.partial(jax.jit, static_argnums=3)
def _draws(g, x, w, spec, keys):
    return jax.vmap(lambda k: dot_backward(g, x, w, LINEAR_DN, spec, k)[0])(keys)


def test_delayed_scaling_uses_the_history_and_returns_it_updated():
    x = jnp.ones((2, 3))
    w = jnp.ones((3, 2))
    spec = GradientSpec(dtype="int8")
    history = jnp.array([0.0, 4.0, 2.0])  # the largest: 4, so S_g = 4 / 127

    def loss(x, w, h):
        return jnp.sum(quantized_backward_dot(LINEAR_DN, spec, True, x, w, None, h) * jnp.array([[1.0, 8.0]]))

    dx, _, dh = jax.grad(loss, argnums=(0, 1, 2))(x, w, history)
    np.testing.assert_allclose(dh, [8.0, 0.0, 4.0])  # new amax first, oldest dropped
    # g = [1, 8] per row, S = 4/127: 1 -> round(31.75) = 32 steps, 8 saturates at 127 S = 4;
    # Q(w) = w (ones)
    np.testing.assert_allclose(dx, np.full((2, 3), 32 * 4 / 127 + 4.0), rtol=1e-6)


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError, match="signed integers or fp8") as e:
        GradientSpec(dtype="uint8")
    assert e.value.field == "dtype"
    with pytest.raises(SpecError, match="signed integers or fp8"):
        GradientSpec(residual_dtype="mxfp4")
    with pytest.raises(SpecError, match="nearest' or 'stochastic") as e:
        GradientSpec(rounding="floor")
    assert e.value.field == "rounding"
    with pytest.raises(SpecError, match="block_size"):
        GradientSpec(block_size=0)
    with pytest.raises(SpecError, match="contractions"):
        GradientSpec(contractions=["input", "input"])
    with pytest.raises(SpecError, match="granularity"):
        GradientSpec(granularity="per_group")
    with pytest.raises(SpecError, match="dtyp"):
        GradientSpec.from_dict({"dtyp": "int8"})
