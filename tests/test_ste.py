"""``qjax.fake_quant``: forward values and the gradients of ste, clipped_ste, lsq and pact.

Every reference is float64 numpy written from the math in ``qjax/ste.py`` and the design notes,
starting from the float32 quotient ``x / S`` that the encoding defines.

XLA does not always divide: under jit it turns ``x / broadcast(S)`` (every per-block scale) and
``alpha / qmax`` into a multiplication by the reciprocal, which can move the quotient by an ulp or
two. So where ``x / S`` lies on a rounding boundary (a half-integer, an integer for stochastic
rounding, or qmin / qmax for LSQ's gradient) to within that ambiguity, the references accept
either side; everywhere else they must agree to float32 precision.
"""

import functools

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

import qjax
from qjax import QParams, QuantSpec

SHAPE = (8, 32)
TINY = np.float32(np.finfo(np.float32).tiny)
QUOTIENT_ULPS = 5e-7  # relative ambiguity of x / S (see the module docstring)

INT8 = QuantSpec(dtype="int8")
INT4 = QuantSpec(dtype="int4")
UINT4 = QuantSpec(dtype="uint4")
INT4_CHANNEL = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)  # grid (1, 32)
UINT4_CHANNEL = QuantSpec(dtype="uint4", granularity="per_channel", axis=-1)
INT4_GROUP = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=4)  # grid (2, 32)
UINT8_TOKEN = QuantSpec(dtype="uint8", granularity="per_token")  # grid (8, 1)
INT8_ASYM = QuantSpec(dtype="int8", symmetric=False)
INT4_ASYM = QuantSpec(dtype="int4", symmetric=False)
INT4_ASYM_CHANNEL = QuantSpec(dtype="int4", symmetric=False, granularity="per_channel", axis=-1)
INT8_FULL = QuantSpec(dtype="int8", narrow_range=False)  # levels -128..127
INT4_FULL_CHANNEL = QuantSpec(dtype="int4", narrow_range=False, granularity="per_channel", axis=-1)
INT2_FULL_GROUP = QuantSpec(dtype="int2", narrow_range=False, granularity="per_group", axis=0, group_size=4)
FP8_CHANNEL = QuantSpec(dtype="float8_e4m3fn", granularity="per_channel", axis=-1)
MXFP4 = QuantSpec(dtype="mxfp4", granularity="per_group", axis=-1)
MXFP8 = QuantSpec(dtype="mxfp8", granularity="per_group", axis=-1)
NVFP4 = QuantSpec(dtype="nvfp4", granularity="per_group", axis=-1)
KMEANS3 = QuantSpec(dtype="kmeans3", kmeans_iters=5)


def float32s(lo: float, hi: float) -> st.SearchStrategy:
    # No subnormals: XLA on CPU flushes them to zero, so -1e-40 would sit on the bound 0.
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32, allow_subnormal=False)


def xs(lo: float = -4.0, hi: float = 4.0) -> st.SearchStrategy:
    return hnp.arrays(np.float32, SHAPE, elements=float32s(lo, hi))


def positive(lo: float, hi: float, shape: tuple[int, ...] = ()) -> st.SearchStrategy:
    return hnp.arrays(np.float32, shape, elements=float32s(lo, hi))


# --- numpy references ---------------------------------------------------------------------------


def qrange(bits: int, signed: bool, symmetric: bool = True, narrow: bool = True) -> tuple[int, int]:
    if not signed:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric and narrow else -qmax - 1), qmax


def per_element(p, shape, dtype=np.float32) -> np.ndarray:
    """Grid-shaped (or scalar / broadcastable) parameters repeated over their blocks."""
    p = np.asarray(p, dtype)
    if p.ndim == 0:
        return np.broadcast_to(p, shape)
    p = p.reshape((1,) * (len(shape) - p.ndim) + p.shape)
    for a, n in enumerate(shape):
        p = np.repeat(p, n // p.shape[a], axis=a)
    return p


def grid_of(p, shape) -> tuple[int, ...]:
    """The grid a (broadcastable) parameter stands for: its shape padded to the tensor's rank."""
    return (1,) * (len(shape) - np.ndim(p)) + np.shape(p)


def block_reduce(t: np.ndarray, grid: tuple[int, ...], fn=np.sum) -> np.ndarray:
    (g0, g1), (n0, n1) = grid, t.shape
    return fn(t.reshape(g0, n0 // g0, g1, n1 // g1), axis=(1, 3))


def near(t: np.ndarray, points) -> np.ndarray:
    """Whether ``t`` is within the quotient's ambiguity of ``points``."""
    with np.errstate(invalid="ignore"):  # inf - inf (x / MIN_SCALE overflowed) is no boundary
        return np.abs(t - points) <= QUOTIENT_ULPS * np.maximum(np.abs(t), 1.0)


def scaled(x, scale, noise=None) -> np.ndarray:
    """x / S (plus the stochastic-rounding draw u), float32 as the encoding defines it, as float64."""
    x32 = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):  # x / MIN_SCALE may overflow to inf, which then clips
        t = x32 / per_element(scale, x32.shape)
    return (t if noise is None else t + noise).astype(np.float64)


def int_qdq_ref(x, scale, qmin, qmax, zero_point=0, noise=None) -> np.ndarray:
    """S (clip(round(x / S) + Z, qmin, qmax) - Z), or floor(x / S + u) for stochastic rounding."""
    t = scaled(x, scale, noise)
    z = per_element(zero_point, t.shape, np.float64)
    q = np.clip((np.round(t) if noise is None else np.floor(t)) + z, qmin, qmax)
    return (q - z) * per_element(scale, t.shape).astype(np.float64)


def assert_same_levels(actual, desired, t, scale, stochastic=False) -> None:
    """Equal to float32 precision, or one level apart where ``t`` = x / S is on a rounding boundary."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    boundary = np.round(t) if stochastic else np.floor(t) + 0.5
    step = per_element(scale, t.shape).astype(np.float64)
    ok = np.isclose(actual, desired, rtol=1e-6, atol=0)
    # one step apart, up to the float32 rounding of both decoded values (on the full range's ties
    # q S is as large as 2^(b-1) S)
    slack = step * (1 + 1e-6) + 2.5e-7 * np.maximum(np.abs(actual), np.abs(desired))
    ok |= near(t, boundary) & (np.abs(actual - desired) <= slack)
    if not ok.all():
        bad = np.argwhere(~ok)[:5].tolist()
        raise AssertionError(f"levels differ at {bad}: {actual[~ok][:5]} != {desired[~ok][:5]}")


def assert_levels(actual, x, scale, qmin, qmax, zero_point=0, noise=None) -> None:
    """``actual`` is the integer fake-quantization of ``x`` with these parameters."""
    desired = int_qdq_ref(x, scale, qmin, qmax, zero_point, noise)
    assert_same_levels(actual, desired, scaled(x, scale, noise), scale, stochastic=noise is not None)


def minmax_qparams_ref(x, grid, bits, signed, symmetric, narrow=True) -> tuple[np.ndarray, np.ndarray]:
    """(S, Z) per block of the min-max range, by the design notes (scale arithmetic in float32):
    symmetric S = 2 amax / (qmax - qmin), amax / qmax when narrow or unsigned."""
    x32 = np.asarray(x, np.float32)
    lo, hi = block_reduce(x32, grid, np.min), block_reduce(x32, grid, np.max)
    qmin, qmax = qrange(bits, signed, symmetric, narrow)
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi)) if signed else np.maximum(hi, np.float32(0))
        half_levels = np.float32((qmax - qmin) / 2 if signed else qmax)
        return np.maximum(amax / half_levels, TINY), np.zeros(grid)
    return affine_qparams_ref(lo, hi, qmin, qmax)


def affine_qparams_ref(lo, hi, qmin, qmax) -> tuple[np.ndarray, np.ndarray]:
    lo = np.minimum(np.float32(lo), np.float32(0))
    hi = np.maximum(np.float32(hi), np.float32(0))
    levels = np.float32(qmax - qmin)
    scale = np.maximum(hi / levels - lo / levels, TINY)
    zero = np.clip(np.round((np.float32(qmin) - lo / scale).astype(np.float64)), qmin, qmax)
    return scale, zero


calibrate = jax.jit(qjax.calibrate, static_argnums=1)


def check_minmax_qparams(qp, x, grid, bits, signed, symmetric, narrow=True) -> None:
    """The calibrated (S, Z) are the min-max parameters: S to an ulp or two, Z exactly unless
    qmin - lo / S is a tie that the ulp can tip."""
    scale, zero = minmax_qparams_ref(x, grid, bits, signed, symmetric, narrow)
    np.testing.assert_allclose(qp.scale, scale, rtol=4e-7, atol=0)
    if symmetric:
        assert qp.zero_point is None
        return
    lo = np.minimum(block_reduce(np.asarray(x, np.float64), grid, np.min), 0.0)
    t = qrange(bits, signed, symmetric)[0] - lo / np.float64(scale)
    diff = np.abs(np.asarray(qp.zero_point, np.float64) - zero)
    assert np.all(np.where(near(t, np.floor(t) + 0.5), diff <= 1, diff == 0)), (qp.zero_point, zero)


def int_unclipped_ref(x, scale, qmin, qmax, zero_point=0, noise=None) -> tuple[np.ndarray, np.ndarray]:
    """The clipped STE's mask of an integer grid, ``(inside, either)``: ``inside`` where clipping
    leaves the code alone, :math:`q_{min} \\le \\operatorname{round}(x/S) + Z \\le q_{max}`
    (:math:`\\lfloor x/S + u \\rfloor` for stochastic rounding); ``either`` where x / S is within
    the quotient's ambiguity of the rounding boundary beyond qmin or qmax, where either is right."""
    t = scaled(x, scale, noise)
    z = per_element(zero_point, t.shape, np.float64)
    v = (np.round(t) if noise is None else np.floor(t)) + z
    # round(t) leaves [qmin, qmax] - Z at qmin - Z - 1/2, qmax - Z + 1/2; floor at qmin - Z, qmax - Z + 1
    lo_edge, hi_edge = (qmin - z - 0.5, qmax - z + 0.5) if noise is None else (qmin - z, qmax - z + 1.0)
    either = near(t, lo_edge) | near(t, hi_edge)
    return (v >= qmin) & (v <= qmax), either


def assert_masked(gx, g, inside, either=None) -> None:
    """``gx`` is ``g`` where ``inside``, 0 elsewhere; where ``either``, g or 0."""
    gx, want = np.asarray(gx), np.where(inside, g, np.float32(0))
    ok = gx == want
    if either is not None:
        ok |= either & ((gx == 0) | (gx == g))
    bad = np.argwhere(~ok)
    assert bad.size == 0, f"{len(bad)} gradients differ from the mask, first at {bad[:5].tolist()}"


def lsq_ref(x, scale, g, qmin, qmax, grad_scale):
    """LSQ's d/dx and d/ds (summed over each block), float64.

    Returns ``(gx, gx_either, gs, gs_tol)``: where x / s is within the quotient's ambiguity of qmin
    or qmax (``gx_either``), d/dx may be g or 0, and the element's d/ds term round(v) - v ~ 0 or
    qmin / qmax, which ``gs_tol`` allows for, as well as float32 rounding of v and of the sums.
    """
    v = scaled(x, np.maximum(np.asarray(scale, np.float32), TINY))
    inside = (v > qmin) & (v < qmax)
    either = near(v, qmin) | near(v, qmax)
    ds = np.where(inside, np.round(v) - v, np.where(v <= qmin, qmin, qmax))
    g64 = np.asarray(g, np.float64)
    grid = grid_of(scale, v.shape)
    g_scale = block_reduce(g64 * ds, grid) * grad_scale
    slack = 4e-6 * np.abs(ds) + QUOTIENT_ULPS * np.abs(v) + either * max(-qmin, qmax)
    tol = block_reduce(np.abs(g64) * slack, grid) * grad_scale + 1e-12
    return np.where(inside, g64, 0.0), either, g_scale, tol


def assert_lsq_grads(gx, gs, x, scale, g, qmin, qmax, grad_scale) -> None:
    ref_gx, either, ref_gs, tol = lsq_ref(x, scale, g, qmin, qmax, grad_scale)
    gx = np.asarray(gx, np.float64)
    assert np.all((gx == ref_gx) | (either & ((gx == 0) | (gx == g)))), "d/dx mask"
    gs = np.asarray(gs, np.float64).reshape(ref_gs.shape)
    assert np.all(np.abs(gs - ref_gs) <= tol), (gs, ref_gs, tol)


def pact_clip_and_scale(x, alpha, bits, signed, narrow=True) -> tuple[np.ndarray, np.ndarray]:
    """y = clip(x, 0 or -alpha, alpha) and the symmetric grid's S for [-alpha, alpha] (alpha / qmax,
    alpha / (qmax + 1/2) on the full signed range), per element, float32."""
    a32 = per_element(alpha, np.shape(x))
    lower = -a32 if signed else np.zeros_like(a32)
    qmin, qmax = qrange(bits, signed, True, narrow)
    scale = np.maximum(a32 / np.float32((qmax - qmin) / 2 if signed else qmax), TINY)
    return np.clip(np.asarray(x, np.float32), lower, a32), scale


def assert_pact_levels(actual, x, alpha, bits, signed, noise=None, narrow=True) -> None:
    y, scale = pact_clip_and_scale(x, alpha, bits, signed, narrow)
    assert_levels(actual, y, scale, *qrange(bits, signed, True, narrow), noise=noise)


def pact_ref(x, alpha, g, bits, signed) -> tuple[np.ndarray, np.ndarray]:
    """PACT's d/dx and d/dalpha (summed over each block of alpha), float64."""
    x32 = np.asarray(x, np.float32)
    a32 = per_element(alpha, x32.shape)
    lower = -a32 if signed else np.zeros_like(a32)
    inside = (x32 > lower) & (x32 < a32)
    d_alpha = (x32 >= a32).astype(np.float64) - (signed * (x32 <= -a32)).astype(np.float64)
    g64 = np.asarray(g, np.float64)
    return np.where(inside, g64, 0.0), block_reduce(g64 * d_alpha, grid_of(alpha, x32.shape))


# --- the function under test, jitted once per static configuration ------------------------------


@functools.partial(jax.jit, static_argnames=("spec", "estimator", "grad_scale"))
def fq_vjp(x, g, param, spec, estimator, qparams=None, key=None, grad_scale=None):
    """``fake_quant``'s output and its VJP at ``g`` wrt ``x`` and the learned parameter."""

    def f(x, p):
        learned = {"lsq": {"scale": p}, "pact": {"clip": p}}.get(estimator, {})
        return qjax.fake_quant(x, spec, estimator, key=key, qparams=qparams, grad_scale=grad_scale, **learned)

    out, vjp = jax.vjp(f, x, param)
    gx, gp = vjp(g)
    return out, gx, gp


@functools.partial(jax.jit, static_argnames=("spec",))
def qdq(x, spec, qparams=None, key=None):
    return qjax.quantize_dequantize(x, spec, qparams=qparams, key=key)


def cotangent(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


# --- ste ----------------------------------------------------------------------------------------

INT_STE_CASES = [
    (INT8, (1, 1), 8, True, True, True),
    (UINT4, (1, 1), 4, False, True, True),
    (INT4_CHANNEL, (1, 32), 4, True, True, True),
    (INT4_GROUP, (2, 32), 4, True, True, True),
    (UINT8_TOKEN, (8, 1), 8, False, True, True),
    (INT8_ASYM, (1, 1), 8, True, False, True),
    (INT4_ASYM_CHANNEL, (1, 32), 4, True, False, True),
    (INT8_FULL, (1, 1), 8, True, True, False),
    (INT4_FULL_CHANNEL, (1, 32), 4, True, True, False),
    (INT2_FULL_GROUP, (2, 32), 2, True, True, False),
]


@pytest.mark.parametrize(("spec", "grid", "bits", "signed", "symmetric", "narrow"), INT_STE_CASES)
@settings(max_examples=15)
@given(x=xs())
def test_ste_forward_matches_reference_and_gradient_is_identity(
    spec, grid, bits, signed, symmetric, narrow, x
):
    g = cotangent()
    out, gx, _ = fq_vjp(x, g, None, spec=spec, estimator="ste")
    np.testing.assert_array_equal(gx, g)
    qp = calibrate(x, spec)
    check_minmax_qparams(qp, x, grid, bits, signed, symmetric, narrow)
    zero = 0 if qp.zero_point is None else qp.zero_point
    qmin, qmax = qrange(bits, signed, symmetric, narrow)
    assert_levels(out, x, qp.scale, qmin, qmax, zero)
    np.testing.assert_array_equal(out, qdq(x, spec))


@pytest.mark.parametrize("spec", [FP8_CHANNEL, MXFP4, MXFP8, NVFP4, KMEANS3], ids=lambda s: s.dtype)
def test_ste_gradient_is_identity_for_float_mx_and_kmeans(spec, rng):
    x = rng.normal(size=SHAPE).astype(np.float32)
    g = cotangent()
    out, gx, _ = fq_vjp(x, g, None, spec=spec, estimator="ste")
    np.testing.assert_array_equal(out, qdq(x, spec))
    np.testing.assert_array_equal(gx, g)
    assert not np.array_equal(out, x)  # it did quantize


def test_ste_fp8_forward_matches_ml_dtypes_reference(rng):
    x = (rng.normal(size=SHAPE) * np.logspace(-3, 2, 32)).astype(np.float32)
    out, _, _ = fq_vjp(x, cotangent(), None, spec=FP8_CHANNEL, estimator="ste")
    scale = np.max(np.abs(x), axis=0, keepdims=True) / np.float32(448)
    v = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    np.testing.assert_allclose(np.asarray(out, np.float64), v * scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_ste_forward_is_exact_for_values_far_outside_the_range(dtype):
    """ste's forward is Q(x) exactly, also where |x| >> |Q(x)| (clipped by static qparams).

    ``x + stop_gradient(Q(x) - x)`` would round ``Q(x) - x`` to the precision of ``x``: in
    bfloat16, 1000 would come out as 0 instead of 7 S.
    """
    x = np.array([[200.0, 1000.0, -333.0, 3.0, 12345.678, -98765.4, 0.1, 0.0]], dtype)
    scale = np.float32(1.203125 / 7)
    qp = QParams(scale=jnp.float32(scale))
    spec = QuantSpec(dtype="int4", granularity="per_token")
    expected = qdq(x, spec, qparams=qp)
    assert_levels(np.asarray(expected, np.float32), x.astype(np.float32), scale, -7, 7)
    out, gx, _ = fq_vjp(x, np.ones_like(x), None, spec=spec, estimator="ste", qparams=qp)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(gx, np.ones_like(x))


def test_ste_forward_is_exact_for_tiny_values():
    """S clamps to MIN_SCALE, so 3 * MIN_SCALE (+ an ulp) quantizes to exactly 3 * MIN_SCALE.

    Here Q(x) - x is subnormal, which XLA flushes to zero: ``x + stop_gradient(Q(x) - x)`` gives x.
    """
    x = np.full((1, 8), np.nextafter(3 * TINY, np.float32(1)), np.float32)
    expected = np.full((1, 8), 3 * TINY, np.float32)
    np.testing.assert_array_equal(qdq(x, INT4), expected)
    out, gx, _ = fq_vjp(x, np.ones_like(x), None, spec=INT4, estimator="ste")
    np.testing.assert_array_equal(gx, np.ones_like(x))
    np.testing.assert_array_equal(out, expected)


@settings(max_examples=15)
@given(x=xs(), scale=positive(0.01, 0.5))
def test_ste_with_static_qparams(x, scale):
    qp = QParams(scale=jnp.float32(scale))
    g = cotangent()
    out, gx, _ = fq_vjp(x, g, None, spec=INT4, estimator="ste", qparams=qp)
    assert_levels(out, x, scale, -7, 7)
    np.testing.assert_array_equal(gx, g)


# --- lsq ----------------------------------------------------------------------------------------

LSQ_CASES = [
    pytest.param(INT4, (), 4, True, id="per_tensor-scalar"),
    pytest.param(INT4, (1, 1), 4, True, id="per_tensor-grid"),
    pytest.param(INT4_CHANNEL, (1, 32), 4, True, id="per_channel-grid"),
    pytest.param(INT4_CHANNEL, (32,), 4, True, id="per_channel-vector"),
    pytest.param(INT4_GROUP, (2, 32), 4, True, id="per_group"),
    pytest.param(UINT8_TOKEN, (8, 1), 8, False, id="uint8-per_token"),
    pytest.param(QuantSpec(dtype="uint4", symmetric=False), (), 4, False, id="uint4-asymmetric"),
    pytest.param(INT4_FULL_CHANNEL, (1, 32), 4, True, id="per_channel-full_range"),
]


@pytest.mark.parametrize(("spec", "scale_shape", "bits", "signed"), LSQ_CASES)
@settings(max_examples=15)
@given(x=xs(), data=st.data())
def test_lsq_forward_and_gradients(spec, scale_shape, bits, signed, x, data):
    scale = data.draw(positive(0.02, 0.6, scale_shape), label="scale")
    qmin, qmax = qrange(bits, signed, narrow=spec.narrow_range)
    n = int(np.prod(SHAPE)) // int(np.prod(np.broadcast_shapes(scale.shape, (1, 1))))
    g = cotangent()
    out, gx, gs = fq_vjp(x, g, jnp.asarray(scale), spec=spec, estimator="lsq")
    assert_levels(out, x, scale, qmin, qmax)
    grid = np.broadcast_shapes(scale.shape, (1, 1))
    np.testing.assert_array_equal(out, qdq(x, spec, qparams=QParams(scale=jnp.asarray(scale).reshape(grid))))
    assert gs.shape == scale.shape and gs.dtype == jnp.float32
    assert_lsq_grads(gx, gs, x, scale, g, qmin, qmax, 1.0 / np.sqrt(n * qmax))


@settings(max_examples=15)
@given(x=xs(), scale=positive(0.05, 0.5), grad_scale=st.sampled_from([0.01, 0.5, 3.0]))
def test_lsq_custom_grad_scale(x, scale, grad_scale):
    """A scalar step size shared by every channel of a per_channel spec: d/ds sums all of them."""
    g = cotangent()
    _, gx, gs = fq_vjp(x, g, jnp.float32(scale), spec=INT4_CHANNEL, estimator="lsq", grad_scale=grad_scale)
    assert gs.shape == ()
    assert_lsq_grads(gx, gs, x, scale, g, -7, 7, grad_scale)


def test_lsq_default_grad_scale_counts_elements_per_block(rng):
    """Halving grad_scale halves d/ds; the default is 1 / sqrt(N qmax), N = 8 rows per channel."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    scale = jnp.full((1, 32), 0.3, jnp.float32)
    g = cotangent()
    _, _, default = fq_vjp(x, g, scale, spec=INT4_CHANNEL, estimator="lsq")
    _, _, explicit = fq_vjp(x, g, scale, spec=INT4_CHANNEL, estimator="lsq", grad_scale=1 / np.sqrt(8 * 7))
    np.testing.assert_allclose(default, explicit, rtol=1e-6)


def loss_of_scale(spec, x, w, grad_scale=1.0):
    return jax.jit(lambda s: jnp.sum(w * qjax.fake_quant(x, spec, "lsq", scale=s, grad_scale=grad_scale)))


def test_lsq_scale_gradient_matches_finite_differences_when_saturated(rng):
    """x / s >= qmax (or <= qmin) everywhere: x_hat = s qmax (s qmin), a smooth function of s."""
    sign = np.where(rng.random(SHAPE) < 0.5, -1.0, 1.0)
    x = (sign * rng.uniform(10.0, 20.0, size=SHAPE)).astype(np.float32)
    w = jnp.asarray(cotangent())
    s = jnp.float32(0.1)
    loss = loss_of_scale(INT4, jnp.asarray(x), w)
    grad = jax.grad(loss)(s)
    h = 1e-3
    fd = (loss(s + h) - loss(s - h)) / (2 * h)
    analytic = np.sum(np.asarray(w, np.float64) * np.where(sign > 0, 7.0, -7.0))
    np.testing.assert_allclose(grad, analytic, rtol=1e-5)
    np.testing.assert_allclose(fd, analytic, rtol=1e-3, atol=1e-3)
    # the default grad_scale multiplies the same derivative by 1 / sqrt(N qmax)
    default = jax.grad(loss_of_scale(INT4, jnp.asarray(x), w, grad_scale=None))(s)
    np.testing.assert_allclose(default, analytic / np.sqrt(x.size * 7), rtol=1e-5)


def test_lsq_per_channel_scale_gradient_matches_finite_differences_when_saturated(rng):
    x = rng.uniform(10.0, 20.0, size=SHAPE).astype(np.float32)
    w = jnp.asarray(cotangent())
    s = jnp.asarray(rng.uniform(0.05, 0.1, size=(1, 32)), jnp.float32)
    loss = loss_of_scale(UINT4_CHANNEL, x, w)
    grad = jax.grad(loss)(s)
    h = 1e-3
    e = np.eye(32, dtype=np.float32)[:, None, :]
    fd = np.array([(loss(s + h * e[j]) - loss(s - h * e[j])) / (2 * h) for j in (0, 7, 31)])
    analytic = 15.0 * np.asarray(w, np.float64).sum(axis=0)
    np.testing.assert_allclose(grad[0], analytic, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fd, analytic[[0, 7, 31]], rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize(
    ("spec", "bits", "grid"),
    [(INT4, 4, (1, 1)), (INT4_CHANNEL, 4, (1, 32)), (INT4_GROUP, 4, (2, 32)), (UINT8_TOKEN, 8, (8, 1))],
)
def test_lsq_init_scale(spec, bits, grid, rng):
    x = (rng.normal(size=SHAPE) * rng.uniform(0.1, 3.0, size=(1, 32))).astype(np.float32)
    _, qmax = qrange(bits, spec.dtype.startswith("int"))
    block = SHAPE[0] // grid[0] * SHAPE[1] // grid[1]
    expected = 2.0 * block_reduce(np.abs(x.astype(np.float64)), grid) / block / np.sqrt(qmax)
    got = jax.jit(qjax.lsq_init_scale, static_argnums=1)(x, spec)
    assert got.shape == grid and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # a zero tensor still gets a positive scale
    assert np.all(np.asarray(qjax.lsq_init_scale(np.zeros(SHAPE, np.float32), spec)) > 0)


# --- pact ---------------------------------------------------------------------------------------

PACT_CASES = [
    pytest.param(INT8, (), 8, True, id="int8-scalar"),
    pytest.param(QuantSpec(dtype="uint4"), (), 4, False, id="uint4-scalar"),
    pytest.param(
        QuantSpec(dtype="uint8", granularity="per_channel", axis=-1),
        (1, 32),
        8,
        False,
        id="uint8-per_channel",
    ),
    pytest.param(INT4_GROUP, (2, 32), 4, True, id="int4-per_group"),
    pytest.param(INT8_FULL, (), 8, True, id="int8-full_range"),
]


@pytest.mark.parametrize(("spec", "clip_shape", "bits", "signed"), PACT_CASES)
@settings(max_examples=15)
@given(x=xs(), data=st.data())
def test_pact_forward_and_gradients(spec, clip_shape, bits, signed, x, data):
    alpha = data.draw(positive(0.25, 3.0, clip_shape), label="alpha")
    g = cotangent()
    out, gx, ga = fq_vjp(x, g, jnp.asarray(alpha), spec=spec, estimator="pact")
    assert_pact_levels(out, x, alpha, bits, signed, narrow=spec.narrow_range)
    # equals quantizing y = clip(x, lower, alpha) with the symmetric scale of [-alpha, alpha]
    grid_alpha = alpha.reshape(np.broadcast_shapes(alpha.shape, (1, 1)))
    _, grid_scale = pact_clip_and_scale(grid_alpha, grid_alpha, bits, signed, spec.narrow_range)
    y, scale = pact_clip_and_scale(x, alpha, bits, signed, spec.narrow_range)
    desired = qdq(y, spec, qparams=QParams(scale=jnp.asarray(grid_scale)))
    assert_same_levels(out, desired, scaled(y, scale), scale)
    ref_gx, ref_ga = pact_ref(x, alpha, g, bits, signed)
    np.testing.assert_array_equal(gx, ref_gx.astype(np.float32))
    assert ga.shape == alpha.shape and ga.dtype == jnp.float32
    np.testing.assert_allclose(ga, ref_ga.reshape(alpha.shape), rtol=0, atol=1e-6 * np.abs(g).sum())


def test_pact_clip_gradient_counts_saturated_elements(rng):
    """With g = 1: d/dalpha = #(x >= alpha) - #(x <= -alpha) (signed), #(x >= alpha) (unsigned)."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    x[0, :4] = [1.0, -1.0, 0.999, -0.999]  # on and just inside the clipping values
    ones = np.ones(SHAPE, np.float32)
    alpha = jnp.float32(1.0)
    _, gx, ga = fq_vjp(x, ones, alpha, spec=INT8, estimator="pact")
    assert float(ga) == np.sum(x >= 1.0) - np.sum(x <= -1.0)
    np.testing.assert_array_equal(gx, (np.abs(x) < 1.0).astype(np.float32))
    _, gx, ga = fq_vjp(x, ones, alpha, spec=UINT4, estimator="pact")
    assert float(ga) == np.sum(x >= 1.0)
    np.testing.assert_array_equal(gx, ((x > 0) & (x < 1.0)).astype(np.float32))


@pytest.mark.parametrize(("spec", "signed"), [(INT8, True), (UINT4, False)], ids=["int8", "uint4"])
def test_pact_clip_gradient_matches_finite_differences_when_saturated(spec, signed, rng):
    """Every |x| > alpha: x_hat = +-alpha exactly, so d/dalpha is smooth."""
    sign = np.where(rng.random(SHAPE) < 0.5, -1.0, 1.0) if signed else np.ones(SHAPE)
    x = jnp.asarray(sign * rng.uniform(3.0, 5.0, size=SHAPE), jnp.float32)
    w = jnp.asarray(cotangent())
    loss = jax.jit(lambda a: jnp.sum(w * qjax.fake_quant(x, spec, "pact", clip=a)))
    alpha = jnp.float32(1.5)
    out = qjax.fake_quant(x, spec, "pact", clip=alpha)
    np.testing.assert_allclose(out, 1.5 * sign, rtol=1e-6)
    h = 1e-2
    fd = (loss(alpha + h) - loss(alpha - h)) / (2 * h)
    analytic = np.sum(np.asarray(w, np.float64) * sign)
    np.testing.assert_allclose(jax.grad(loss)(alpha), analytic, rtol=1e-5)
    np.testing.assert_allclose(fd, analytic, rtol=1e-3, atol=1e-3)


# --- transformations, dtypes, stochastic rounding -----------------------------------------------


def test_jit_matches_eager(rng):
    """Eager and jitted calls give the same levels (XLA may move x / S by an ulp differently)."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    s = np.full((1, 32), 0.2, np.float32)
    minmax_scale = minmax_qparams_ref(x, (1, 32), 4, True, True)[0]
    y, pact_scale = pact_clip_and_scale(x, s, 4, False)
    cases = [
        ("ste", None, x, minmax_scale),
        ("clipped_ste", None, x, minmax_scale),
        ("lsq", s, x, s),
        ("pact", s, y, pact_scale),
    ]
    for est, param, t_of, scale in cases:
        spec = INT4_CHANNEL if est != "pact" else UINT4_CHANNEL
        learned = {"lsq": "scale", "pact": "clip"}.get(est)

        def f(x, p, spec=spec, est=est, learned=learned):
            return qjax.fake_quant(x, spec, est, **({learned: p} if learned else {}))

        eager, jitted = f(x, param), jax.jit(f)(x, param)
        assert_same_levels(eager, jitted, scaled(t_of, scale), scale)
    # the enum and its string name are the same estimator
    np.testing.assert_array_equal(
        qjax.fake_quant(x, INT4, qjax.Estimator.LSQ, scale=jnp.float32(0.2)),
        qjax.fake_quant(x, INT4, "lsq", scale=jnp.float32(0.2)),
    )


def test_vmap_over_batch(rng):
    xb = (
        rng.normal(size=(3, *SHAPE)).astype(np.float32) * np.array([0.5, 1.0, 4.0], np.float32)[:, None, None]
    )
    s = jnp.full((1, 32), 0.3, jnp.float32)
    ste = jax.jit(jax.vmap(lambda x: qjax.fake_quant(x, INT4_CHANNEL)))(xb)
    lsq = jax.jit(jax.vmap(lambda x: qjax.fake_quant(x, INT4_CHANNEL, "lsq", scale=s)))(xb)
    pact = jax.jit(jax.vmap(lambda x, a: qjax.fake_quant(x, INT8, "pact", clip=a)))(
        xb, jnp.array([0.5, 1.0, 2.0])
    )
    for i, x in enumerate(xb):  # each example calibrated / clipped on its own
        scale, _ = minmax_qparams_ref(x, (1, 32), 4, True, True)
        assert_levels(ste[i], x, scale, -7, 7)
        assert_levels(lsq[i], x, s, -7, 7)
        assert_pact_levels(pact[i], x, np.float32([0.5, 1.0, 2.0][i]), 8, True)


def test_vmap_of_grad(rng):
    """Per-example gradients: shared or batched learned parameters, each matching the reference."""
    xb = rng.normal(size=(3, *SHAPE)).astype(np.float32)
    wb = rng.normal(size=(3, *SHAPE)).astype(np.float32)
    sb = rng.uniform(0.1, 0.4, size=(3, 1, 32)).astype(np.float32)

    def lsq_loss(x, s, w):
        return jnp.sum(w * qjax.fake_quant(x, INT4_CHANNEL, "lsq", scale=s))

    def pact_loss(x, a, w):
        return jnp.sum(w * qjax.fake_quant(x, INT8, "pact", clip=a))

    grad_lsq = jax.grad(lsq_loss, argnums=(0, 1))
    shared_gx, shared_gs = jax.jit(jax.vmap(grad_lsq, in_axes=(0, None, 0)))(xb, jnp.asarray(sb[0]), wb)
    batched_gx, batched_gs = jax.jit(jax.vmap(grad_lsq))(xb, sb, wb)
    pact_gx, pact_ga = jax.jit(jax.vmap(jax.grad(pact_loss, argnums=(0, 1)), in_axes=(0, None, 0)))(
        xb, jnp.float32(1.0), wb
    )
    scale_grad = 1 / np.sqrt(8 * 7)
    for i in range(3):
        for gx, gs, scale in [(shared_gx, shared_gs, sb[0]), (batched_gx, batched_gs, sb[i])]:
            assert_lsq_grads(gx[i], gs[i], xb[i], scale, wb[i], -7, 7, scale_grad)
        ref_gx, ref_ga = pact_ref(xb[i], np.float32(1.0), wb[i], 8, True)
        np.testing.assert_array_equal(pact_gx[i], ref_gx.astype(np.float32))
        np.testing.assert_allclose(pact_ga[i], ref_ga.sum(), rtol=0, atol=1e-6 * np.abs(wb[i]).sum())


@pytest.mark.parametrize("estimator", ["ste", "clipped_ste", "lsq", "pact"])
def test_bfloat16_in_bfloat16_out(estimator, rng):
    x = rng.normal(size=SHAPE).astype(ml_dtypes.bfloat16)
    g = cotangent().astype(ml_dtypes.bfloat16)
    param = {"lsq": jnp.float32(0.2), "pact": jnp.float32(1.5)}.get(estimator)
    spec = INT4 if estimator != "pact" else UINT4
    out, gx, gp = fq_vjp(x, g, param, spec=spec, estimator=estimator)
    assert out.dtype == jnp.bfloat16 and gx.dtype == jnp.bfloat16
    out32, gx32, gp32 = fq_vjp(
        x.astype(np.float32), g.astype(np.float32), param, spec=spec, estimator=estimator
    )
    np.testing.assert_array_equal(out, np.asarray(out32).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(gx, np.asarray(gx32).astype(ml_dtypes.bfloat16))
    if param is not None:
        assert gp.dtype == jnp.float32
        np.testing.assert_allclose(gp, gp32, rtol=1e-6)


STOCHASTIC = QuantSpec(dtype="int4", granularity="per_channel", axis=-1, rounding="stochastic")


def test_stochastic_rounding_ste(rng):
    """floor(x / S + u) with u = jax.random.uniform(key, x.shape); the gradient stays the identity."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    key = jax.random.key(7)
    u = np.asarray(jax.random.uniform(key, SHAPE, jnp.float32))
    g = cotangent()
    out, gx, _ = fq_vjp(x, g, None, spec=STOCHASTIC, estimator="ste", key=key)
    scale = calibrate(x, STOCHASTIC).scale
    check_minmax_qparams(calibrate(x, STOCHASTIC), x, (1, 32), 4, True, True)
    assert_levels(out, x, scale, -7, 7, noise=u)
    np.testing.assert_array_equal(gx, g)
    assert np.any(np.asarray(out) != int_qdq_ref(x, scale, -7, 7).astype(np.float32))  # not nearest
    np.testing.assert_array_equal(out, qdq(x, STOCHASTIC, key=key))


def test_stochastic_rounding_learned_and_clipped(rng):
    x = rng.normal(size=SHAPE).astype(np.float32)
    key = jax.random.key(7)
    u = np.asarray(jax.random.uniform(key, SHAPE, jnp.float32))
    g = cotangent()
    s = np.full((1, 32), 0.25, np.float32)
    qp = QParams(scale=jnp.asarray(s))
    out, gx, _ = fq_vjp(x, g, None, spec=STOCHASTIC, estimator="clipped_ste", key=key, qparams=qp)
    assert_levels(out, x, s, -7, 7, noise=u)
    np.testing.assert_array_equal(out, qdq(x, STOCHASTIC, qparams=qp, key=key))
    assert_masked(gx, g, *int_unclipped_ref(x, s, -7, 7, noise=u))
    out, _, _ = fq_vjp(x, g, jnp.asarray(s), spec=STOCHASTIC, estimator="lsq", key=key)
    assert_levels(out, x, s, -7, 7, noise=u)
    np.testing.assert_array_equal(out, qdq(x, STOCHASTIC, qparams=qp, key=key))

    pact_spec = QuantSpec(dtype="uint4", rounding="stochastic")
    out, _, _ = fq_vjp(x, g, jnp.float32(1.5), spec=pact_spec, estimator="pact", key=key)
    assert_pact_levels(out, x, np.float32(1.5), 4, False, noise=u)
    other, _, _ = fq_vjp(x, g, jnp.float32(1.5), spec=pact_spec, estimator="pact", key=jax.random.key(8))
    assert not np.array_equal(out, other)


@pytest.mark.parametrize(
    ("estimator", "kw"),
    [("ste", {}), ("clipped_ste", {}), ("lsq", {"scale": 0.2}), ("pact", {"clip": 1.0})],
)
def test_stochastic_rounding_without_key_raises(estimator, kw):
    spec = STOCHASTIC if estimator != "pact" else QuantSpec(dtype="uint4", rounding="stochastic")
    kw = {k: jnp.float32(v) for k, v in kw.items()}
    with pytest.raises(ValueError, match="needs a PRNG key"):
        qjax.fake_quant(jnp.ones(SHAPE), spec, estimator, **kw)


# --- errors -------------------------------------------------------------------------------------


def test_errors():
    x = jnp.ones(SHAPE)
    s = jnp.float32(0.1)
    with pytest.raises(ValueError, match=r"estimator='lsq' needs scale=.*lsq_init_scale"):
        qjax.fake_quant(x, INT4, "lsq")
    with pytest.raises(ValueError, match=r"estimator='pact' needs clip="):
        qjax.fake_quant(x, UINT4, "pact")
    with pytest.raises(ValueError, match=r"scale= is a learned parameter of estimator 'lsq', not of 'ste'"):
        qjax.fake_quant(x, INT4, "ste", scale=s)
    with pytest.raises(ValueError, match=r"clip= is a learned parameter of estimator 'pact', not of 'lsq'"):
        qjax.fake_quant(x, INT4, "lsq", scale=s, clip=s)
    with pytest.raises(ValueError, match=r"scale= .* not of 'clipped_ste'"):
        qjax.fake_quant(x, INT4, "clipped_ste", scale=s)
    for est, kw in [("lsq", {"scale": s}), ("pact", {"clip": s})]:
        with pytest.raises(
            ValueError, match=rf"estimator='{est}' learns an integer grid; dtype='float8_e4m3fn'"
        ):
            qjax.fake_quant(x, QuantSpec(dtype="float8_e4m3fn"), est, **kw)
        with pytest.raises(ValueError, match=r"zero point 0: set symmetric=True, or use an unsigned dtype"):
            qjax.fake_quant(x, INT8_ASYM, est, **kw)
    with pytest.raises(ValueError, match="learns an integer grid"):
        qjax.lsq_init_scale(x, QuantSpec(dtype="mxfp4", granularity="per_group", axis=-1))
    with pytest.raises(ValueError, match="set symmetric=True"):
        qjax.lsq_init_scale(x, INT8_ASYM)
    with pytest.raises(
        ValueError, match=r"scale has shape \(8, 1\), which does not broadcast to .* \(1, 32\)"
    ):
        qjax.fake_quant(x, INT4_CHANNEL, "lsq", scale=jnp.ones((8, 1)))
    with pytest.raises(ValueError, match=r"scale has shape \(4,\), which does not broadcast"):
        qjax.fake_quant(x, INT4_CHANNEL, "lsq", scale=jnp.ones((4,)))
    with pytest.raises(ValueError, match=r"clip has shape \(1, 1, 32\), which does not broadcast"):
        qjax.fake_quant(x, INT4_CHANNEL, "pact", clip=jnp.ones((1, 1, 32)))
    with pytest.raises(TypeError, match="scale must be a float array; got dtype int32"):
        qjax.fake_quant(x, INT4, "lsq", scale=jnp.int32(1))
    with pytest.raises(ValueError, match=r"estimator='lsqq' is not one of .*; did you mean 'lsq'\?"):
        qjax.fake_quant(x, INT4, "lsqq", scale=s)
    with pytest.raises(ValueError, match=r"did you mean 'clipped_ste'\?"):
        qjax.fake_quant(x, INT4, "clipped-ste")
    with pytest.raises(TypeError, match=r"spec must be a qjax\.QuantSpec"):
        qjax.fake_quant(x, "int8")
    with pytest.raises(TypeError, match="quantization needs a floating-point tensor"):
        qjax.fake_quant(jnp.ones(SHAPE, jnp.int32), INT8)
    with pytest.raises(ValueError, match="has a codebook, not a scale"):
        qjax.fake_quant(x, KMEANS3, "clipped_ste")


def test_clipped_ste_checks_static_qparams_shape_like_ste():
    """A mis-shaped static qparams is refused with the same message on both STE paths."""
    x = jnp.ones(SHAPE)
    bad = QParams(scale=jnp.ones((8, 1)))
    with pytest.raises(ValueError, match=r"qparams.scale has shape \(8, 1\) .* shape \(1, 32\)"):
        qjax.fake_quant(x, INT4_CHANNEL, "ste", qparams=bad)
    with pytest.raises(ValueError, match=r"qparams.scale has shape \(8, 1\) .* shape \(1, 32\)"):
        qjax.fake_quant(x, INT4_CHANNEL, "clipped_ste", qparams=bad)
