"""Invariants of the quantizers, checked on values that hypothesis draws (shapes stay fixed, so
every spec compiles once): the rounding error bound, idempotence, exact zero, stochastic rounding
statistics, floor/ceil bias, odd symmetry, no NaN/Inf from finite inputs, and k-means recovery.

References are float64 numpy computations of the math in DESIGN.md, never the function under test.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from qjax import QParams, QuantSpec

SHAPE = (16, 64)
EPS32 = float(np.finfo(np.float32).eps)
MIN_SCALE = float(np.finfo(np.float32).tiny)

# Granularity -> (QuantSpec fields, block extent on each axis of SHAPE), the block written by hand.
GRANULARITIES = {
    "per_tensor": ({}, (16, 64)),
    "per_channel": ({"granularity": "per_channel", "axis": -1}, (16, 1)),
    "per_token": ({"granularity": "per_token"}, (1, 64)),
    "per_group": ({"granularity": "per_group", "axis": 0, "group_size": 4}, (4, 1)),
    "per_block": ({"granularity": "per_block", "block_shape": (8, 16)}, (8, 16)),
}
MX_GROUP = {"granularity": "per_group", "axis": -1}


def _spec(dtype: str, granularity: str = "per_tensor", **kw) -> QuantSpec:
    return QuantSpec(dtype=dtype, **GRANULARITIES[granularity][0], **kw)


def _per_element(x: np.ndarray, block: tuple[int, int], reduce) -> np.ndarray:
    """``reduce`` over each block of 2-D ``x``, repeated over the block's elements."""
    (n0, n1), (b0, b1) = x.shape, block
    t = x.reshape(n0 // b0, b0, n1 // b1, b1)
    return np.broadcast_to(reduce(t, axis=(1, 3), keepdims=True), t.shape).reshape(x.shape)


def _grid_to_elements(p, shape: tuple[int, ...]) -> np.ndarray:
    """Grid-shaped parameters repeated over their blocks, as float64."""
    p = np.asarray(jnp.asarray(p, jnp.float32), np.float64)
    for axis, (g, n) in enumerate(zip(p.shape, shape, strict=True)):
        p = np.repeat(p, n // g, axis=axis)
    return p


def _int_range(dtype: str, symmetric: bool) -> tuple[int, int]:
    bits = int(dtype.removeprefix("u").removeprefix("int"))
    if dtype.startswith("u"):
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def _reference_scale(x: np.ndarray, dtype: str, symmetric: bool, block: tuple[int, int]) -> np.ndarray:
    """Minmax scale of every element's block, float64, from DESIGN.md."""
    qmin, qmax = _int_range(dtype, symmetric)
    x = x.astype(np.float64)
    hi = _per_element(x, block, np.max)
    lo = _per_element(x, block, np.min)
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi)) if qmin < 0 else np.maximum(hi, 0.0)
        return np.maximum(amax / qmax, MIN_SCALE)
    return np.maximum((np.maximum(hi, 0.0) - np.minimum(lo, 0.0)) / (qmax - qmin), MIN_SCALE)


@st.composite
def tensors(draw, shape=SHAPE, ties=True):
    """Float32 tensors of varied magnitude and offset (some blocks all positive or all negative),
    with occasional exact zeros and (``ties``) values on a coarse grid: repeats and exact ties."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = 10.0 ** draw(st.floats(-4, 4))
    offset = draw(st.sampled_from([0.0, 0.0, 3.0, -3.0, 0.5]))
    x = (rng.standard_normal(shape) + offset * rng.uniform(0.5, 1.5, size=(1, shape[1]))) * magnitude
    if draw(st.booleans()):
        x[rng.random(shape) < 0.05] = 0.0
    if ties and draw(st.booleans()):
        x = np.round(x / magnitude * 4) * magnitude / 4  # many ties and repeated values
    return x.astype(np.float32)


_quantize = jax.jit(qjax.quantize, static_argnums=1)
_dequantize = jax.jit(qjax.dequantize)


@functools.cache
def _calibrated(spec: QuantSpec):
    """Jitted ``x -> (Q(x), qparams)``."""
    return jax.jit(lambda x: (qjax.quantize_dequantize(x, spec), qjax.calibrate(x, spec)))


@functools.cache
def _with_qparams(spec: QuantSpec):
    return jax.jit(lambda x, qp: qjax.quantize_dequantize(x, spec, qparams=qp))


# --- nearest rounding: error <= S/2 inside the range ------------------------------------------

INT_CASES = [
    *[
        (d, sym, "per_channel")
        for d, sym in itertools.product(["int2", "int3", "int8", "uint2", "uint8"], [True, False])
    ],
    *[(d, sym, g) for d, sym, g in itertools.product(["int4", "uint4"], [True, False], GRANULARITIES)],
]


@pytest.mark.parametrize(("dtype", "symmetric", "granularity"), INT_CASES)
@given(x=tensors())
def test_nearest_error_at_most_half_a_step(dtype, symmetric, granularity, x):
    spec = _spec(dtype, granularity, symmetric=symmetric)
    q, qp = _calibrated(spec)(x)
    block = GRANULARITIES[granularity][1]
    s = _reference_scale(x, dtype, symmetric, block)
    np.testing.assert_allclose(_grid_to_elements(qp.scale, x.shape), s, rtol=4 * EPS32)
    qmin, qmax = _int_range(dtype, symmetric)
    z = 0.0 if qp.zero_point is None else _grid_to_elements(qp.zero_point, x.shape)
    lo, hi = (qmin - z) * s, (qmax - z) * s
    x64, q64 = x.astype(np.float64), np.asarray(q, np.float64)
    slack = 4 * EPS32 * (np.abs(x64) + s)
    # Minmax puts every element inside the range or within S/2 of its edge (Z is rounded), except
    # the negative values that an unsigned symmetric quantizer clips to 0.
    near = (x64 >= lo - s / 2 - slack) & (x64 <= hi + s / 2 + slack)
    clipped_negative = dtype.startswith("u") and symmetric
    assert np.all(near | ((x64 < 0) & clipped_negative))
    err = np.abs(x64 - q64)
    assert np.all(err[near] <= s[near] / 2 + slack[near]), np.max(err[near] / s[near])
    np.testing.assert_array_equal(q64[~near], 0.0)


@pytest.mark.parametrize(
    ("dtype", "symmetric"), [("int4", True), ("int4", False), ("uint8", False), ("int3", True)]
)
@given(x=tensors())
def test_percentile_clips_outside_and_rounds_inside(dtype, symmetric, x):
    spec = _spec(dtype, "per_channel", symmetric=symmetric, calibration="percentile", percentile=90.0)
    q, qp = _calibrated(spec)(x)
    qmin, qmax = _int_range(dtype, symmetric)
    s = _grid_to_elements(qp.scale, x.shape)
    z = 0.0 if qp.zero_point is None else _grid_to_elements(qp.zero_point, x.shape)
    lo, hi = (qmin - z) * s, (qmax - z) * s
    x64, q64 = x.astype(np.float64), np.asarray(q, np.float64)
    slack = 4 * EPS32 * (np.abs(x64) + s)
    inside = (x64 >= lo) & (x64 <= hi)
    assert np.all(np.abs(x64 - q64)[inside] <= s[inside] / 2 + slack[inside])
    # Outside the range values saturate at its nearest end (at most half a step inside it).
    below, above = x64 < lo, x64 > hi
    np.testing.assert_allclose(q64[below], lo[below], rtol=4 * EPS32, atol=0)
    np.testing.assert_allclose(q64[above], hi[above], rtol=4 * EPS32, atol=0)


# --- idempotence: Q(Q(x)) = Q(x) ---------------------------------------------------------------

IDEMPOTENT_SPECS = [
    _spec("int4", "per_channel"),
    _spec("int4", "per_group", symmetric=False),
    _spec("int8", "per_tensor", symmetric=False),
    _spec("int2", "per_block"),
    _spec("uint4", "per_token", symmetric=False),
    _spec("uint3", "per_channel"),
    _spec("float8_e4m3fn", "per_tensor"),
    _spec("float8_e4m3fn", "per_channel"),
    _spec("float8_e5m2", "per_token"),
    _spec("float4_e2m1fn", "per_block"),
    QuantSpec(dtype="mxfp8", **MX_GROUP),
    QuantSpec(dtype="mxfp4", **MX_GROUP),
    QuantSpec(dtype="nvfp4", **MX_GROUP),
]


@functools.cache
def _requantize(spec: QuantSpec):
    @jax.jit
    def twice(x):
        q1 = qjax.quantize(x, spec)
        x1 = qjax.dequantize(q1)
        q2 = qjax.quantize(x1, spec)
        return q1.values, x1, q2.values, qjax.dequantize(q2), q1.zero_point, q2.zero_point

    return twice


@pytest.mark.parametrize("spec", IDEMPOTENT_SPECS, ids=lambda s: f"{s.dtype}-{s.granularity}-{s.symmetric}")
@given(data=st.data())
def test_idempotence(spec, data):
    """Requantizing Q(x) reproduces the stored codes exactly. The float32 scale recomputed from
    Q(x) may differ from the first one in the last bit (fl(fl(q S) / q) != S in general), so the
    dequantized values agree to a few ulp; power-of-two (MX) scales make them bit-exact.

    Asymmetric quantizers get data without exact ties: when qmin - lo/S is exactly a half-integer,
    rounding Z half to even can leave max(x) one level short of qmax (e.g. int4, lo = -6.5 S,
    hi = 8.5 S: Z = round(-1.5) = -2 and round(8.5) + Z = 6), so Q(x) spans 14 levels instead of
    15 and its own minmax scale differs: idempotence fails there in exact arithmetic too.
    """
    x = data.draw(tensors(ties=spec.symmetric))
    v1, x1, v2, x2, z1, z2 = _requantize(spec)(x)
    np.testing.assert_array_equal(np.asarray(v2.astype(jnp.float32)), np.asarray(v1.astype(jnp.float32)))
    if z1 is not None:
        np.testing.assert_array_equal(z2, z1)
    if spec.dtype.startswith("mx"):
        np.testing.assert_array_equal(x2, x1)
    else:
        np.testing.assert_allclose(x2, x1, rtol=4 * EPS32, atol=0)


# Element exponent of the largest value, and the mantissas 1 <= m < 2 the element format holds.
MX_ELEMENT = {"mxfp8": (8, [1.0, 1.125, 1.25, 1.5, 1.75]), "mxfp4": (2, [1.0, 1.5])}


@pytest.mark.parametrize("name", list(MX_ELEMENT))
@given(exponent=st.integers(-118, 127), data=st.data())
def test_mx_scale_is_the_exact_power_of_two(name, exponent, data):
    """A block whose absolute maximum is m * 2^e (1 <= m < 2) gets the E8M0 scale 2^(e - emax)
    exactly (OCP MX: floor(log2 amax) - emax), so m * 2^e is stored as m * 2^emax, unsaturated."""
    emax, mantissas = MX_ELEMENT[name]
    amax = np.float32(data.draw(st.sampled_from(mantissas)) * 2.0**exponent)
    x = np.full((1, 32), amax / 4, np.float32)
    x[0, 5] = -amax
    q = _quantize(x, QuantSpec(dtype=name, **MX_GROUP))
    assert float(q.scale.astype(jnp.float32)[0, 0]) == 2.0 ** (exponent - emax)
    assert float(_dequantize(q)[0, 5]) == -float(amax)


# --- 0.0 is exact ------------------------------------------------------------------------------


@functools.cache
def _zeros_through(spec: QuantSpec):
    @jax.jit
    def run(x, mask):
        qp = qjax.calibrate(x, spec)
        from_static = qjax.quantize_dequantize(jnp.zeros_like(x), spec, qparams=qp)
        from_dynamic = qjax.quantize_dequantize(jnp.where(mask, 0.0, x), spec)
        return from_static, from_dynamic

    return run


@pytest.mark.parametrize(
    ("dtype", "symmetric", "granularity"),
    [
        ("int8", False, "per_tensor"),
        ("int4", False, "per_channel"),
        ("int3", False, "per_group"),
        ("uint4", False, "per_token"),
        ("uint8", False, "per_block"),
        ("int4", True, "per_channel"),
        ("uint4", True, "per_tensor"),
        ("int2", True, "per_block"),
    ],
)
@pytest.mark.parametrize("sign", ["mixed", "positive", "negative"])
@given(x=tensors(), zero_fraction=st.floats(0.0, 0.5))
def test_zero_is_exact(dtype, symmetric, granularity, sign, x, zero_fraction):
    """0.0 maps to exactly 0.0, also under parameters calibrated on data whose range excludes 0."""
    if sign == "positive":
        x = np.abs(x) + np.float32(1e-3) * np.max(np.abs(x))
    elif sign == "negative":
        x = -np.abs(x) - np.float32(1e-3) * np.max(np.abs(x))
    mask = np.random.default_rng(0).random(x.shape) < zero_fraction
    from_static, from_dynamic = _zeros_through(_spec(dtype, granularity, symmetric=symmetric))(x, mask)
    assert np.all(np.asarray(from_static) == 0.0)
    assert np.all(np.asarray(from_dynamic)[mask] == 0.0)


# --- stochastic rounding -----------------------------------------------------------------------

N_KEYS = 2000
# 6 standard errors of the mean of N_KEYS draws of a value that is one of two neighbours a step
# apart; the standard error is at most step * sqrt(p (1 - p) / n) <= step / (2 sqrt(n)).
SR_TOLERANCE = 6 * 0.5 / np.sqrt(N_KEYS)  # in steps: 0.067


def _draws(spec: QuantSpec, qparams: QParams | None = None):
    """Jitted ``(x, seed) -> Q(x)`` for N_KEYS keys (vmap over keys)."""

    @jax.jit
    def run(x, seed):
        keys = jax.random.split(jax.random.key(seed), N_KEYS)
        qp = qparams if qparams is not None else qjax.calibrate(x, spec)
        return jax.vmap(lambda k: qjax.quantize_dequantize(x, spec, key=k, qparams=qp))(keys), qp

    return run


SR_CASES = [
    _spec("int4", "per_channel", rounding="stochastic"),
    _spec("int8", "per_token", symmetric=False, rounding="stochastic"),
    _spec("uint3", "per_block", symmetric=False, rounding="stochastic"),
]
_SR_RUNS = {spec: _draws(spec) for spec in SR_CASES}


@pytest.mark.parametrize("spec", SR_CASES, ids=lambda s: s.dtype)
@settings(max_examples=8)
@given(x=tensors(shape=(16, 32)), seed=st.integers(0, 2**31 - 1))
def test_stochastic_rounding_is_unbiased_and_one_step(spec, x, seed):
    draws, qp = _SR_RUNS[spec](x, seed)
    draws = np.asarray(draws, np.float64)
    s = _grid_to_elements(qp.scale, x.shape)
    z = 0.0 if qp.zero_point is None else _grid_to_elements(qp.zero_point, x.shape)
    x64 = x.astype(np.float64)
    # Every draw is the floor or the ceiling neighbour of x on the grid of multiples of S.
    k = draws / s
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    y = x64 / s
    assert np.all(np.round(k) >= np.floor(y - 1e-5)) and np.all(np.round(k) <= np.ceil(y + 1e-5))
    # Unbiased, element by element, for elements strictly inside the range.
    qmin, qmax = _int_range(spec.dtype, spec.symmetric)
    inside = (y + z > qmin) & (y + z < qmax)
    bias = (draws.mean(axis=0) - x64) / s
    assert np.all(np.abs(bias[inside]) <= SR_TOLERANCE), np.max(np.abs(bias[inside]))
    # And in aggregate: 6 standard errors of the mean of all N_KEYS * inside.sum() draws.
    assert abs(bias[inside].mean()) <= 6 * 0.5 / np.sqrt(N_KEYS * inside.sum())


def _float_grid(name: str) -> np.ndarray:
    """Every finite value of a float format, sorted, float64."""
    codes = 16 if name == "float4_e2m1fn" else 256  # ml_dtypes stores fp4 one code per byte
    values = np.arange(codes, dtype=np.uint8).view(getattr(ml_dtypes, name)).astype(np.float64)
    return np.unique(values[np.isfinite(values)])


FLOAT_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "float4_e2m1fn": 6.0}
_FP_RUNS = {
    name: _draws(QuantSpec(dtype=name, rounding="stochastic"), QParams(scale=jnp.ones((1, 1), jnp.float32)))
    for name in FLOAT_MAX
}


@pytest.mark.parametrize("name", list(FLOAT_MAX))
@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), data_seed=st.integers(0, 2**32 - 1))
def test_stochastic_rounding_into_float_formats(name, seed, data_seed):
    """With scale 1 the values are rounded onto the format's own grid: each draw is one of the two
    neighbours of x, and the mean over keys is x within the binomial standard error."""
    grid = _float_grid(name)
    rng = np.random.default_rng(data_seed)
    fmax = FLOAT_MAX[name]
    # Log-uniform magnitudes over the whole range, subnormals included, both signs.
    x = rng.choice([-1.0, 1.0], size=(16, 32)) * np.exp2(
        rng.uniform(np.log2(grid[grid > 0][0]) - 1, np.log2(fmax), (16, 32))
    )
    x = x.astype(np.float32)
    draws, _ = _FP_RUNS[name](x, seed)
    draws = np.asarray(draws, np.float64)
    x64 = x.astype(np.float64)
    below = grid[np.searchsorted(grid, x64, side="right") - 1]
    above = grid[np.minimum(np.searchsorted(grid, x64, side="left"), grid.size - 1)]
    assert np.all((draws == below) | (draws == above))
    step = np.where(above > below, above - below, 1.0)
    bias = (draws.mean(axis=0) - x64) / step
    assert np.all(np.abs(bias) <= SR_TOLERANCE), np.max(np.abs(bias))


def test_stochastic_rounding_needs_a_key():
    spec = QuantSpec(dtype="int4", rounding="stochastic")
    with pytest.raises(
        ValueError, match=r"rounding='stochastic' needs a PRNG key; pass key=jax\.random\.key"
    ):
        qjax.quantize_dequantize(jnp.ones((2, 2)), spec)


def test_stochastic_rounding_depends_on_the_key_only():
    spec = QuantSpec(dtype="int4", rounding="stochastic")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
    run = jax.jit(lambda x, k: qjax.quantize_dequantize(x, spec, key=k))
    a, b, c = run(x, jax.random.key(1)), run(x, jax.random.key(1)), run(x, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))


# --- floor / ceil ------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["floor", "ceil"])
@pytest.mark.parametrize(
    ("dtype", "symmetric"), [("int8", True), ("int4", False), ("uint8", False), ("int3", True)]
)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), magnitude=st.floats(-20, 20))
def test_floor_and_ceil_are_biased_by_half_a_step(rounding, dtype, symmetric, seed, magnitude):
    """Over uniform data inside the range, x - Q(x) lies in [0, S) for floor and (-S, 0] for ceil,
    and its mean is +S/2 / -S/2 within 6 standard errors (the error is ~U[0, S): sd S/sqrt(12))."""
    rng = np.random.default_rng(seed)
    qmin, qmax = _int_range(dtype, symmetric)
    scale = (2.0**magnitude * rng.uniform(0.5, 2.0, (1, 64))).astype(np.float32)
    zero = None if symmetric else rng.integers(qmin, qmax + 1, (1, 64))
    z = 0 if zero is None else zero
    x = (rng.uniform(qmin - z, qmax - z, (64, 64)) * scale).astype(np.float32)  # per-channel ranges
    qp = QParams(
        jnp.asarray(scale), None if zero is None else jnp.asarray(zero, jnp.int8 if qmin < 0 else jnp.uint8)
    )
    spec = _spec(dtype, "per_channel", symmetric=symmetric, rounding=rounding)
    q = _with_qparams(spec)(x, qp)
    err = (x.astype(np.float64) - np.asarray(q, np.float64)) / scale
    sign = 1.0 if rounding == "floor" else -1.0
    tol = 4 * EPS32 * (np.abs(x) / scale + 1)
    assert np.all(sign * err >= -tol) and np.all(sign * err < 1 + tol)
    assert abs(err.mean() - sign * 0.5) <= 6 / np.sqrt(12 * err.size)


# --- odd symmetry ------------------------------------------------------------------------------

ODD_SPECS = [
    *[_spec("int4", g) for g in GRANULARITIES],
    _spec("int8", "per_channel"),
    _spec("int2", "per_token"),
    _spec("float8_e4m3fn", "per_group"),
    _spec("float8_e5m2", "per_tensor"),
    _spec("float4_e2m1fn", "per_channel"),
    QuantSpec(dtype="mxfp4", **MX_GROUP),
    QuantSpec(dtype="mxfp8", **MX_GROUP),
    QuantSpec(dtype="nvfp4", **MX_GROUP),
]
_ODD_RUNS = {spec: jax.jit(lambda x, spec=spec: qjax.quantize_dequantize(x, spec)) for spec in ODD_SPECS}


@pytest.mark.parametrize("spec", ODD_SPECS, ids=lambda s: f"{s.dtype}-{s.granularity}")
@given(x=tensors())
def test_symmetric_quantizer_is_odd(spec, x):
    run = _ODD_RUNS[spec]
    np.testing.assert_array_equal(np.asarray(run(-x)), -np.asarray(run(x)))


@pytest.mark.parametrize("dtype", ["int4", "int8"])
@given(k=st.lists(st.integers(-6, 5), min_size=64, max_size=64), exponent=st.integers(-20, 20))
def test_nearest_ties_round_half_to_even_symmetrically(dtype, k, exponent):
    """Values exactly halfway between two levels go to the even level, the same for -x and x."""
    scale = 2.0**exponent
    x = ((np.asarray(k, np.float64) + 0.5) * scale).astype(np.float32).reshape(1, 64)
    run = _with_qparams(QuantSpec(dtype=dtype))
    expected = np.round(np.asarray(k, np.float64) + 0.5) * scale  # numpy rounds half to even
    qp = QParams(scale=jnp.full((1, 1), scale, jnp.float32))
    np.testing.assert_array_equal(np.asarray(run(x, qp), np.float64).ravel(), expected)
    np.testing.assert_array_equal(np.asarray(run(-x, qp)), -np.asarray(run(x, qp)))


# --- no NaN or Inf from finite inputs ----------------------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)


def _hard_inputs() -> dict[str, np.ndarray]:
    """Finite inputs that break naive scales, each of shape (16, 32)."""
    rng = np.random.default_rng(0)
    shape = (16, 32)
    mixed_block = np.zeros(shape)
    mixed_block[:, ::2] = 1e-40  # blocks of subnormals beside blocks of huge values
    mixed_block[:, 1::2] = 3e38
    return {
        "zeros": np.zeros(shape),
        "constant": np.full(shape, 3.0),
        "negative_constant": np.full(shape, -3.0),
        "subnormal": np.full(shape, 1e-40),
        "negative_subnormal": np.full(shape, -1e-40),
        "tiny": rng.standard_normal(shape) * 1e-30,
        "huge": rng.standard_normal(shape) * 1e30,
        "constant_3e38": np.full(shape, 3e38),
        "constant_minus_3e38": np.full(shape, -3e38),
        "mixed_3e38_and_tiny": rng.choice([3e38, -3e38, 1e-40, -1e-30, 0.0, 1.0], size=shape),
        "near_float32_max": rng.uniform(0.99, 1.0, shape) * F32_MAX,
        "constant_minus_float32_max": np.full(shape, -F32_MAX),
        "mixed_float32_max_and_tiny": rng.choice([F32_MAX, -F32_MAX, 1e-40, 0.0, 1.0], size=shape),
        "huge_and_subnormal_blocks": mixed_block,
    }


def _finiteness_specs():
    granularities = {
        "per_tensor": {},
        "per_channel": {"granularity": "per_channel", "axis": -1},
        "per_token": {"granularity": "per_token"},
        "per_group": {"granularity": "per_group", "axis": 0, "group_size": 8},
        "per_block": {"granularity": "per_block", "block_shape": (4, 8)},
    }
    cycle = itertools.cycle(granularities.values())
    for bits in range(2, 9):  # each width once symmetric and once asymmetric, every granularity
        yield QuantSpec(dtype=f"int{bits}", symmetric=bits % 2 == 0, **next(cycle))
        yield QuantSpec(dtype=f"uint{bits}", symmetric=bits % 2 == 1, **next(cycle))
    for g in granularities.values():
        for name in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"):
            yield QuantSpec(dtype=name, **g)
    for name in ("mxfp8", "mxfp4", "nvfp4"):
        yield QuantSpec(dtype=name, **MX_GROUP)
    yield QuantSpec(dtype="nvfp4", granularity="per_group", axis=0)
    for calibration in ("percentile", "mse"):
        yield QuantSpec(
            dtype="int4", symmetric=False, calibration=calibration, mse_grid=8, **granularities["per_channel"]
        )
        yield QuantSpec(dtype="float8_e4m3fn", calibration=calibration, mse_grid=8)
    for bits in range(1, 9):
        yield QuantSpec(
            dtype=f"kmeans{bits}", kmeans_iters=5, **(granularities["per_channel"] if bits % 2 else {})
        )


HARD = _hard_inputs()
HARD_STACK = np.stack(list(HARD.values())).astype(np.float32)


@pytest.mark.parametrize(
    "spec",
    list(_finiteness_specs()),
    ids=lambda s: f"{s.dtype}-{s.granularity}-{s.symmetric}-{s.calibration}",
)
def test_no_nan_or_inf_from_finite_inputs(spec):
    codebook = spec.dtype.startswith("kmeans")

    def paths(x):
        out = [
            qjax.dequantize(qjax.quantize(x, spec)),
            qjax.quantize_dequantize(x, spec),
            qjax.fake_quant(x, spec),
        ]
        if not codebook:
            out.append(qjax.fake_quant(x, spec, "clipped_ste"))
        return jnp.stack(out)

    out = np.asarray(jax.jit(jax.vmap(paths))(HARD_STACK), np.float64)  # (case, path, 16, 32)
    x = np.broadcast_to(HARD_STACK[:, None].astype(np.float64), out.shape)
    names = np.array(list(HARD))
    bad = ~np.isfinite(out)
    assert not bad.any(), f"NaN or Inf for inputs {sorted(set(names[np.nonzero(bad)[0]]))}"
    if codebook:
        # Centroids are means of the block's values: inside the range of the whole tensor (up to
        # the subnormals, which XLA on CPU flushes to zero).
        lo = x.min(axis=(2, 3), keepdims=True) - MIN_SCALE
        hi = x.max(axis=(2, 3), keepdims=True) + MIN_SCALE
        outside = (out < lo) | (out > hi)
        assert not outside.any(), (
            f"values outside the data's range for {sorted(set(names[np.nonzero(outside)[0]]))}"
        )
    else:
        # Affine and float formats keep 0.0 and never flip a sign.
        flipped = (out * x < 0) | ((x == 0) & (out != 0))
        assert not flipped.any(), f"zero or sign changed for {sorted(set(names[np.nonzero(flipped)[0]]))}"


# --- k-means -----------------------------------------------------------------------------------


def _mixture(
    rng: np.random.Generator, centres: np.ndarray, n: int, spread: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around each centre (shuffled); returns the points and their cluster labels."""
    labels = rng.permutation(np.repeat(np.arange(centres.size), n))
    return centres[labels] + spread * rng.standard_normal(labels.size), labels


@st.composite
def separated_centres(draw, k=4):
    """``k`` sorted centres, evenly spaced up to a jitter of a tenth of the gap (so that k-means'
    linear initialisation between the extremes already separates the clusters)."""
    base = draw(st.floats(-10, 10))
    gap = draw(st.floats(0.5, 5))
    jitter = draw(st.lists(st.floats(-0.1, 0.1), min_size=k, max_size=k))
    return base + gap * (np.arange(k) + np.asarray(jitter)), gap


_KMEANS_TENSOR = jax.jit(lambda x: qjax.quantize(x, QuantSpec(dtype="kmeans2")))
_KMEANS_CHANNEL = jax.jit(
    lambda x: qjax.quantize(x, QuantSpec(dtype="kmeans2", granularity="per_channel", axis=-1))
)


@settings(max_examples=15)
@given(centres=separated_centres(), seed=st.integers(0, 2**32 - 1))
def test_kmeans_recovers_the_centroids_per_tensor(centres, seed):
    centres, gap = centres
    rng = np.random.default_rng(seed)
    points, labels = _mixture(rng, centres, 64, spread=1e-3 * gap)
    x = points.astype(np.float32).reshape(16, 16)
    q = _KMEANS_TENSOR(x)
    codebook = np.asarray(q.codebook, np.float64).reshape(4)
    # The converged centroids are the means of the true clusters.
    x64 = x.astype(np.float64).ravel()
    means = np.array([x64[labels == c].mean() for c in range(4)])
    np.testing.assert_allclose(codebook, means, rtol=0, atol=1e-5 * (np.abs(centres).max() + 1))
    np.testing.assert_array_equal(np.asarray(q.values).ravel(), labels)
    out = np.asarray(_dequantize(q), np.float64).ravel()
    np.testing.assert_array_equal(out, codebook[labels])


@settings(max_examples=10)
@given(
    centres=st.lists(separated_centres(), min_size=5, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_kmeans_recovers_the_centroids_per_channel(centres, seed):
    rng = np.random.default_rng(seed)
    columns, all_labels, means = [], [], []
    for c, gap in centres:
        points, labels = _mixture(rng, c, 32, spread=1e-3 * gap)
        points = points.astype(np.float32)
        columns.append(points)
        all_labels.append(labels)
        means.append([points.astype(np.float64)[labels == j].mean() for j in range(4)])
    x = np.stack(columns, axis=-1)  # (128, 5): a different mixture in each channel
    q = _KMEANS_CHANNEL(x)
    codebook = np.asarray(q.codebook, np.float64)
    assert codebook.shape == (1, 5, 4)
    scale = max(np.abs(c).max() for c, _ in centres) + 1
    np.testing.assert_allclose(codebook[0], np.asarray(means), rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(np.asarray(q.values), np.stack(all_labels, axis=-1))


@pytest.mark.parametrize(
    ("dtype", "granularity"),
    [("kmeans1", "per_tensor"), ("kmeans3", "per_channel"), ("kmeans4", "per_tensor")],
)
@settings(max_examples=10)
@given(x=tensors())
def test_kmeans_values_are_codebook_entries(dtype, granularity, x):
    spec = _spec(dtype, granularity)
    q = _quantize(x, spec)
    out = np.asarray(_dequantize(q))
    codebook = np.asarray(q.codebook)
    k = 2 ** int(dtype.removeprefix("kmeans"))
    assert codebook.shape[-1] == k and np.all(np.diff(codebook, axis=-1) >= 0)  # sorted centroids
    if granularity == "per_tensor":
        book = np.broadcast_to(codebook.reshape(1, 1, k), (*x.shape, k))
    else:
        book = np.broadcast_to(codebook.reshape(1, x.shape[1], k), (*x.shape, k))
    assert np.all(np.any(out[..., None] == book, axis=-1))
    # Each value goes to its nearest centroid.
    dist = np.abs(x.astype(np.float64)[..., None] - book.astype(np.float64))
    chosen = np.abs(x.astype(np.float64) - out.astype(np.float64))
    assert np.all(chosen <= dist.min(axis=-1) * (1 + 1e-6) + 1e-30 + 4 * EPS32 * np.abs(x))


def test_kmeans_compression_ratio_of_the_design_notes():
    """16 float32 weights at kmeans2 per tensor: 16 * 2 bits of indices + 4 * 32 bits of codebook
    = 160 bits against 512: 3.2x."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16,)), jnp.float32)
    q = qjax.quantize(x, QuantSpec(dtype="kmeans2"))
    assert q.nbytes * 8 == 16 * 2 + 4 * 32
    assert q.compression_ratio() == pytest.approx(512 / 160)
