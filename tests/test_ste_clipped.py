"""``fake_quant(..., 'clipped_ste')``: the forward value is ``quantize_dequantize``'s; the gradient
is 1 where clipping did not change the rounded code and 0 elsewhere (``qjax/ste.py``).

References are float64 numpy of that rule, from the float32 quotient ``x / S``: integers
:math:`q_{min} \\le \\operatorname{round}(x/S) + Z \\le q_{max}`; float formats: ``x / S`` rounded
to nearest (ties to even) onto the format's grid continued past :math:`f_{max}` stays within
:math:`\\pm f_{max}`. Where the quotient lies within float32 error of the rounding boundary beyond
the range, either gradient is accepted (see ``tests/test_ste.py``).
"""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

import qjax
from qjax import QParams, QuantSpec
from qjax.numerics import tiling
from qjax.numerics.calibration import block_range
from qjax.numerics.quantize import clip_bounds, clipped_by_nearest
from tests.test_ste import (
    FP8_CHANNEL,
    INT4,
    INT4_ASYM,
    INT4_ASYM_CHANNEL,
    INT4_CHANNEL,
    INT8,
    INT8_ASYM,
    INT8_FULL,
    MXFP4,
    MXFP8,
    NVFP4,
    SHAPE,
    UINT4,
    affine_qparams_ref,
    assert_levels,
    assert_masked,
    calibrate,
    cotangent,
    fq_vjp,
    int_unclipped_ref,
    near,
    positive,
    qdq,
    qrange,
    xs,
)

TENSORS = 200  # random tensors per dynamic-scale case


def check_clipped_ste(x, spec, qparams, scale, zero, qmin, qmax, *, expect_clipped=True):
    """Forward = quantize_dequantize with the same parameters; gradient = the integer-domain mask."""
    g = cotangent()
    out, gx, _ = fq_vjp(x, g, None, spec=spec, estimator="clipped_ste", qparams=qparams)
    np.testing.assert_array_equal(out, qdq(x, spec, qparams=qparams))
    inside, either = int_unclipped_ref(x, scale, qmin, qmax, zero)
    assert_masked(gx, g, inside, either)
    if expect_clipped:
        assert np.any(~inside) and np.any(inside)
    return out


def float_unclipped_ref(y, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, either)`` of a float format for the scaled ``y``: nearest rounding with ties to even
    keeps |y| within fmax up to fmax + step / 2 (step: the top binade's spacing), the tie included
    when fmax's mantissa is even; ``either`` within float32 error of that tie."""
    fi = ml_dtypes.finfo(dtype)
    fmax = float(fi.max)
    step = 2.0 ** (np.floor(np.log2(fmax)) - fi.nmant)
    tie = fmax + step / 2
    a = np.abs(np.asarray(y, np.float64))
    inside = (a < tie) | ((a == tie) & ((fmax / step) % 2 == 0))
    return inside, near(a, tie)


# --- static parameters --------------------------------------------------------------------------


@settings(max_examples=20)
@given(x=xs(-1.0, 1.0), zero=st.integers(-8, 7))
def test_static_asymmetric_mask_around_the_range_edges(x, zero):
    """S = 2^-4 makes x / S exact: the mask is the rule itself, ties included (round half to even
    decides whether qmin - 1/2 and qmax + 1/2 round inside)."""
    x = x.copy()
    s = 0.0625
    steps = np.array([-0.75, -0.5, -0.25, 0.0])
    x[0, :8] = s * np.concatenate([(-8 - zero) + steps, (7 - zero) - steps])
    x[1, :2] = np.float32(s * (-8 - zero)) - np.float32(1e-3), np.float32(s * (7 - zero)) + np.float32(1e-3)
    qp = QParams(scale=jnp.float32(s), zero_point=jnp.int8(zero))
    g = cotangent()
    out, gx, _ = fq_vjp(x, g, None, spec=INT4_ASYM, estimator="clipped_ste", qparams=qp)
    np.testing.assert_array_equal(out, qdq(x, INT4_ASYM, qparams=qp))
    assert_levels(out, x, s, -8, 7, zero)
    v = np.round(x.astype(np.float64) / s) + zero  # exact
    np.testing.assert_array_equal(gx, np.where((v >= -8) & (v <= 7), g, np.float32(0)))
    # on the edges and a quarter step beyond them the gradient passes (the float bounds
    # [S (qmin - Z), S (qmax - Z)] would stop the latter); three quarters beyond, it does not
    assert np.all(gx[0, [2, 3, 6, 7]] == g[0, [2, 3, 6, 7]])
    assert gx[0, 0] == 0 and gx[0, 4] == 0
    assert gx[1, 0] != 0 and gx[1, 1] != 0  # just outside the float bounds, still rounding inside


@settings(max_examples=15)
@given(x=xs(-1.0, 2.0), scale=positive(0.01, 0.2), zero=st.integers(0, 15))
def test_static_unsigned(x, scale, zero):
    """uint4: Z = 0 clips the negative values below -S/2 (gradient 0 there); asymmetric shifts the
    range."""
    sym = QParams(scale=jnp.float32(scale))
    out = check_clipped_ste(x, UINT4, sym, scale, 0, 0, 15, expect_clipped=False)
    assert_levels(out, x, scale, 0, 15)
    spec = QuantSpec(dtype="uint4", symmetric=False)
    asym = QParams(scale=jnp.float32(scale), zero_point=jnp.uint8(zero))
    out = check_clipped_ste(x, spec, asym, scale, zero, 0, 15, expect_clipped=False)
    assert_levels(out, x, scale, 0, 15, zero)


@pytest.mark.parametrize("spec", [INT8_FULL, INT4_CHANNEL], ids=["int8-full_range", "int4-narrow"])
@settings(max_examples=10)
@given(x=xs(-2.0, 2.0), scale=positive(0.01, 0.3))
def test_static_symmetric(spec, x, scale):
    bits = 8 if spec.dtype == "int8" else 4
    qmin, qmax = qrange(bits, True, True, spec.narrow_range)
    qp = QParams(scale=jnp.full((1, 1) if spec.granularity == "per_tensor" else (1, 32), scale))
    out = check_clipped_ste(x, spec, qp, scale, 0, qmin, qmax, expect_clipped=False)
    assert_levels(out, x, scale, qmin, qmax)


def test_static_float_format(rng):
    """fp8: x / S rounds within +-448 up to 464 (the tie rounds to 448's even mantissa)."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    scale = np.full((1, 32), 1.5 / 448, np.float32)
    x[0, :4] = np.float32(463.0) * scale[0, 0], np.float32(465.0) * scale[0, 0], 470 * scale[0, 0], 0.0
    g = cotangent()
    qp = QParams(scale=jnp.asarray(scale))
    out, gx, _ = fq_vjp(x, g, None, spec=FP8_CHANNEL, estimator="clipped_ste", qparams=qp)
    np.testing.assert_array_equal(out, qdq(x, FP8_CHANNEL, qparams=qp))
    inside, either = float_unclipped_ref(x / scale, ml_dtypes.float8_e4m3fn)
    assert np.any(~inside) and np.any((np.abs(x / scale) > 448 * (1 + 1e-6)) & inside)
    assert_masked(gx, g, inside, either)
    assert gx[0, 0] != 0 and gx[0, 1] == 0 and gx[0, 2] == 0


# --- calibrated (dynamic) parameters ------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("spec",))
def dynamic_masks(xb, spec):
    """Per tensor of the batch: the clipped STE's gradient with g = 1, and the float-bounds mask
    ``x in [lo, hi]`` of ``clip_bounds`` (the rule before the integer-domain one)."""

    def one(x):
        gx = jax.grad(lambda x: jnp.sum(qjax.fake_quant(x, spec, "clipped_ste")))(x)
        lo, hi = clip_bounds(x.shape, spec, qjax.calibrate(x, spec))
        return gx, (x >= lo) & (x <= hi), qjax.calibrate(x, spec).scale

    return jax.vmap(one)(xb)


def random_tensors(seed: int) -> np.ndarray:
    """``TENSORS`` tensors of SHAPE: normal, with magnitudes over 12 decades and offsets (some
    tensors all positive or all negative, where asymmetric ranges widen to include 0)."""
    rng = np.random.default_rng(seed)
    magnitude = 10.0 ** rng.uniform(-6, 6, (TENSORS, 1, 1))
    offset = rng.choice([0.0, 0.0, 3.0, -3.0], (TENSORS, 1, 1))
    return ((rng.normal(size=(TENSORS, *SHAPE)) + offset) * magnitude).astype(np.float32)


# spec, and how many of the TENSORS tensors the float-bounds rule masks some element of (at least;
# 14 and 137 with these tensors): symmetric, 127 S can land an ulp below max|x|; asymmetric, the
# rounded zero point shifts the grid by up to S/2 past the minimum or the maximum
DYNAMIC_UNMASKED = [
    pytest.param(INT8, 5, id="int8"),
    pytest.param(INT8_ASYM, 100, id="int8-asymmetric"),
    pytest.param(INT4_ASYM, 100, id="int4-asymmetric"),
    pytest.param(INT4_ASYM_CHANNEL, 100, id="int4-asymmetric-per_channel"),
    pytest.param(QuantSpec(dtype="uint8", symmetric=False, granularity="per_token"), 100, id="uint8-asym"),
    pytest.param(FP8_CHANNEL, 0, id="fp8-per_channel"),
    pytest.param(QuantSpec(**{**MXFP8.to_dict(), "mx_scale_rounding": "ceil"}), 0, id="mxfp8-ceil"),
    pytest.param(QuantSpec(**{**MXFP4.to_dict(), "mx_scale_rounding": "ceil"}), 0, id="mxfp4-ceil"),
]


@pytest.mark.parametrize(("spec", "float_rule_failures"), DYNAMIC_UNMASKED)
def test_dynamic_scales_mask_nothing(spec, float_rule_failures):
    """Scales calibrated from x: every element lies in its block's range, so the gradient is 1
    everywhere, whatever float32 rounding does to max|x| / S or to the rounded zero point."""
    gx, float_inside, _ = dynamic_masks(random_tensors(0), spec)
    gx, float_inside = np.asarray(gx), np.asarray(float_inside)
    masked = np.sum(gx != 1, axis=(1, 2))
    assert np.all(masked == 0), f"{np.sum(masked > 0)} of {TENSORS} tensors have masked elements"
    assert np.sum(np.any(~float_inside, axis=(1, 2))) >= float_rule_failures


@pytest.mark.parametrize("spec", [INT8, INT8_ASYM, INT4_ASYM_CHANNEL], ids=["int8", "int8-asym", "int4-asym"])
def test_clipping_statistics_count_in_the_integer_domain(spec):
    """``clipped_by_nearest`` (what the layer diagnostics and ``weight_clip_fraction`` count): with
    scales calibrated from x nothing is clipped, although the float bounds exclude some extremes;
    on a grid shrunk to 0.7 of the range, exactly the elements whose float64 code leaves the grid."""
    xb = random_tensors(3)[:40]
    count = jax.jit(jax.vmap(lambda x: jnp.sum(clipped_by_nearest(x, spec, qjax.calibrate(x, spec)))))
    assert int(jnp.sum(count(xb))) == 0
    qmin, qmax = qrange(int(spec.dtype[3:]), True, spec.symmetric, spec.narrow_range)
    block = tiling.block_shape(SHAPE, spec)
    for x in xb[:8]:
        lo, hi = block_range(jnp.asarray(x), spec, block)
        shrunk = spec.affine_format.qparams(0.7 * lo, 0.7 * hi, spec.symmetric)
        zero = 0 if shrunk.zero_point is None else np.asarray(shrunk.zero_point)
        inside, either = int_unclipped_ref(x, np.asarray(shrunk.scale), qmin, qmax, zero)
        got = np.asarray(clipped_by_nearest(jnp.asarray(x), spec, shrunk))
        assert np.any(got)
        np.testing.assert_array_equal(got[~either], ~inside[~either])


@pytest.mark.parametrize(
    "spec", [INT8_FULL, QuantSpec(dtype="int3", narrow_range=False)], ids=["int8", "int3"]
)
def test_dynamic_full_range_masks_only_the_positive_maximum(spec):
    """The full-range grid puts +max|x| on the tie q_max + 1/2, which rounds (to even) onto the
    clipped q_max + 1 or, an ulp lower, onto q_max: its gradient follows the rule there. Every
    other element, -max|x| included (on -q_max - 1/2, inside either way), keeps its gradient."""
    xb = random_tensors(1)
    gx, _, scale = dynamic_masks(xb, spec)
    gx = np.asarray(gx)
    top = xb == np.max(xb, axis=(1, 2), keepdims=True)
    amax_is_top = np.max(np.abs(xb), axis=(1, 2), keepdims=True) == np.max(xb, axis=(1, 2), keepdims=True)
    positive_max = top & amax_is_top
    assert np.all(gx[~positive_max] == 1)
    bits = int(spec.dtype[3:])
    qmin, qmax = qrange(bits, True, True, False)
    for i in np.flatnonzero(np.any(positive_max, axis=(1, 2))):
        inside, either = int_unclipped_ref(xb[i], np.asarray(scale[i]), qmin, qmax)
        assert_masked(gx[i], np.ones(SHAPE, np.float32), inside, either)


def test_dynamic_mx_floor_masks_the_saturated_maxima():
    """MX with the OCP exponent: a block maximum whose mantissa exceeds fmax's scales above fmax and
    saturates (gradient 0); the power-of-two scale makes x / S exact, so the mask is exact."""
    xb = random_tensors(2)[:50]
    gx, _, scale = dynamic_masks(xb, MXFP8)
    gx = np.asarray(gx)
    y = xb / np.repeat(np.asarray(scale).astype(np.float32), 32, axis=-1)
    inside, either = float_unclipped_ref(y, ml_dtypes.float8_e4m3fn)
    assert not np.any(either)
    np.testing.assert_array_equal(gx, inside.astype(np.float32))
    blocks = np.any(~inside, axis=-1)
    assert 0.05 < np.mean(blocks) < 0.4, np.mean(blocks)  # saturating block maxima are common


def test_dynamic_nvfp4_mask(rng):
    x = rng.standard_t(3, size=SHAPE).astype(np.float32)
    g = cotangent()
    out, gx, _ = fq_vjp(x, g, None, spec=NVFP4, estimator="clipped_ste")
    np.testing.assert_array_equal(out, qdq(x, NVFP4))
    qp = calibrate(x, NVFP4)
    s = np.asarray(qp.scale).astype(np.float32) * np.asarray(qp.tensor_scale)
    inside, either = float_unclipped_ref(x / np.repeat(s, 16, axis=-1), ml_dtypes.float4_e2m1fn)
    assert_masked(gx, g, inside, either)


def test_dynamic_symmetric_percentile():
    """Calibrated from x (qparams=None): S = P_90(|x|) / 127, from numpy.percentile."""
    spec = QuantSpec(dtype="int8", calibration="percentile", percentile=90.0)
    x = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    g = cotangent()
    out, gx, _ = fq_vjp(x, g, None, spec=spec, estimator="clipped_ste")
    np.testing.assert_array_equal(out, qdq(x, spec))
    scale = np.float32(np.percentile(np.abs(x).astype(np.float64), 90.0)) / np.float32(127)
    assert_levels(out, x, scale, -127, 127)
    inside, either = int_unclipped_ref(x, scale, -127, 127)
    assert 0.05 < np.mean(~inside) < 0.2
    assert_masked(gx, g, inside, either)


def test_dynamic_asymmetric_percentile_per_channel(rng):
    spec = QuantSpec(
        dtype="int4",
        symmetric=False,
        granularity="per_channel",
        axis=-1,
        calibration="percentile",
        percentile=80.0,
    )
    x = (rng.normal(size=SHAPE) + rng.normal(size=(1, 32))).astype(np.float32)
    lo = np.percentile(x.astype(np.float64), 20.0, axis=0, keepdims=True)
    hi = np.percentile(x.astype(np.float64), 80.0, axis=0, keepdims=True)
    scale, zero = affine_qparams_ref(lo, hi, -8, 7)
    qp = calibrate(x, spec)
    np.testing.assert_allclose(qp.scale, scale, rtol=1e-6)
    np.testing.assert_array_equal(qp.zero_point, zero)
    check_clipped_ste(x, spec, None, scale, zero, -8, 7)


@pytest.mark.parametrize("spec", [INT4_ASYM_CHANNEL, INT4], ids=["asymmetric", "symmetric"])
def test_mse_calibration(spec, rng):
    """MSE-calibrated 4-bit ranges clip the tails of a heavy-tailed tensor."""
    spec = QuantSpec(**{**spec.to_dict(), "calibration": "mse", "mse_grid": 20})
    x = rng.standard_t(3, size=SHAPE).astype(np.float32)
    qp = calibrate(x, spec)
    zero = 0 if qp.zero_point is None else qp.zero_point
    qmin, qmax = qrange(4, True, spec.symmetric)
    check_clipped_ste(x, spec, qp, qp.scale, zero, qmin, qmax)
    check_clipped_ste(x, spec, None, qp.scale, zero, qmin, qmax)  # dynamic: the same ranges


def test_dynamic_unsigned_asymmetric_per_token(rng):
    spec = QuantSpec(
        dtype="uint8", symmetric=False, granularity="per_token", calibration="percentile", percentile=95.0
    )
    x = rng.normal(size=SHAPE).astype(np.float32)
    lo = np.percentile(x.astype(np.float64), 5.0, axis=1, keepdims=True)
    hi = np.percentile(x.astype(np.float64), 95.0, axis=1, keepdims=True)
    scale, zero = affine_qparams_ref(lo, hi, 0, 255)
    check_clipped_ste(x, spec, None, scale, zero, 0, 255)
