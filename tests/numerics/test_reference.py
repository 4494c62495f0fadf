"""Quantization numerics against independent numpy references of the formulas.

Integer formats are checked for every combination of bits (2..8), signedness, symmetric and
asymmetric ranges, the narrow and the full symmetric signed range (``narrow_range``), granularity,
deterministic rounding and calibration against a float64 reference:

.. math::

    S = \\frac{2 \\max|r|}{q_{max} - q_{min}} \\ \\text{(symmetric signed)}, \\qquad
    S = \\frac{r_{max} - r_{min}}{q_{max} - q_{min}},\\
    Z = \\operatorname{clip}(\\operatorname{round}(q_{min} - r_{min}/S)) \\ \\text{(asymmetric)},

    q = \\operatorname{clip}(\\operatorname{round}(r / S) + Z, q_{min}, q_{max}), \\qquad
    \\hat r = (q - Z) S.

The library computes in float32, the reference in float64, so ``S`` agrees to a relative 1e-6,
and ``q`` agrees exactly except where the float64 ``r / S`` lies within float32 error of a rounding
boundary (a half-integer for nearest, an integer for floor/ceil): there ``q`` must be one of the two
neighbours, and such elements must be rare. Under ``jit``, a float32 numpy reference of the same
operations in the same order must agree bit for bit. Divisions are defined as multiplications by
a reciprocal rounded once to float32 (``r / S`` is ``r * fl(1/S)``, ``max|r| / qmax`` is
``max|r| * fl(1/qmax)``; see ``qjax/numerics/formats.py``): the scale, ``Z``, ``q`` and
``dequantize`` are then exact.

Float formats (fp8, fp4, MX, NVFP4) are checked against ``ml_dtypes`` casts of the saturated,
scaled values computed in float32 numpy.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qjax

TINY = float(np.finfo(np.float32).tiny)
# Float32 arithmetic puts the library's x / S within ~1e-6 (relative) of the float64 value (the
# scale check below bounds it); a float64 x / S closer than this to a rounding boundary may round
# either way.
BOUNDARY_RTOL = 1e-5
SCALE_RTOL = 1e-6
PERCENTILE = 99.0  # low enough that blocks of 8..64 elements really clip their extremes

DISTRIBUTIONS = ("normal", "uniform", "heavy_tailed", "positive")
SHAPE_2D = (64, 48)
SHAPE_3D = (4, 32, 16)


@functools.cache
def sample(distribution: str, shape: tuple[int, ...]) -> np.ndarray:
    """Fixed float32 test data (read-only, shared between tests)."""
    rng = np.random.default_rng(DISTRIBUTIONS.index(distribution) * 1000 + len(shape))
    if distribution == "normal":
        x = rng.standard_normal(shape)
    elif distribution == "uniform":
        x = rng.uniform(-3.0, 1.0, shape)  # lopsided, so asymmetric zero points are far from 0
    elif distribution == "heavy_tailed":
        x = rng.standard_t(1.5, shape)
    else:
        x = rng.lognormal(0.0, 1.0, shape)
    x = x.astype(np.float32)
    x.flags.writeable = False
    return x


# ----------------------------------------------------------------------------------------------
# Tiling: written out by hand, independently of qjax.numerics.tiling.


class Tiling(NamedTuple):
    shape: tuple[int, ...]
    spec_kwargs: dict
    block: tuple[int, ...]  # the block extents the granularity means, derived by hand


TILINGS = {
    "per_tensor": Tiling(SHAPE_2D, dict(granularity="per_tensor"), (64, 48)),
    "per_channel_last": Tiling(SHAPE_2D, dict(granularity="per_channel", axis=-1), (64, 1)),
    "per_channel_first": Tiling(SHAPE_2D, dict(granularity="per_channel", axis=0), (1, 48)),
    "per_channel_two_axes": Tiling(SHAPE_3D, dict(granularity="per_channel", axis=(0, -1)), (1, 32, 1)),
    "per_token_2d": Tiling(SHAPE_2D, dict(granularity="per_token"), (1, 48)),
    "per_token_3d": Tiling(SHAPE_3D, dict(granularity="per_token"), (1, 1, 16)),
    "per_group_axis0": Tiling(SHAPE_2D, dict(granularity="per_group", axis=0, group_size=16), (16, 1)),
    "per_group_axis1": Tiling(SHAPE_2D, dict(granularity="per_group", axis=1, group_size=16), (1, 16)),
    "per_group_3d": Tiling(SHAPE_3D, dict(granularity="per_group", axis=-2, group_size=8), (1, 8, 1)),
    "per_block_2d": Tiling(SHAPE_2D, dict(granularity="per_block", block_shape=(16, 16)), (16, 16)),
    "per_block_3d": Tiling(SHAPE_3D, dict(granularity="per_block", block_shape=(8, 8)), (1, 8, 8)),
}


def grid_of(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n // b for n, b in zip(shape, block, strict=True))


def to_blocks(x: np.ndarray, block: tuple[int, ...]) -> np.ndarray:
    """``x`` as ``grid + (elements per block,)``."""
    tiled = [v for n, b in zip(x.shape, block, strict=True) for v in (n // b, b)]
    perm = [*range(0, 2 * x.ndim, 2), *range(1, 2 * x.ndim, 2)]
    return x.reshape(tiled).transpose(perm).reshape((*grid_of(x.shape, block), -1))


def repeat_blocks(p: np.ndarray, block: tuple[int, ...]) -> np.ndarray:
    """Grid-shaped parameters repeated over their blocks, to the tensor's shape."""
    for axis, b in enumerate(block):
        p = np.repeat(p, b, axis=axis)
    return p


def test_to_blocks_groups_the_elements_of_each_block():
    x = np.arange(4 * 6).reshape(4, 6)
    np.testing.assert_array_equal(to_blocks(x, (2, 3))[1, 0], [12, 13, 14, 18, 19, 20])
    np.testing.assert_array_equal(repeat_blocks(np.array([[1, 2]]), (2, 3)), [[1, 1, 1, 2, 2, 2]] * 2)


# ----------------------------------------------------------------------------------------------
# Float64 reference of the integer formats.


def qrange(bits: int, signed: bool, symmetric: bool, narrow: bool = True) -> tuple[int, int]:
    """Narrow signed symmetric [-(2^(b-1) - 1), 2^(b-1) - 1]; otherwise all 2^b levels."""
    if not signed:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric and narrow else -qmax - 1), qmax


PERCENTILE_POSITION_RTOL = 2.5e-7  # jnp.percentile computes the position p/100 * (n - 1) in float32


class BlockRange(NamedTuple):
    """A per-block calibrated range (grid-shaped, float64) and ``rtol``, the relative error that
    float32 calibration may put on the scale and on ``lo / S``."""

    lo: np.ndarray
    hi: np.ndarray
    rtol: np.ndarray | float


def percentile_range(flat: np.ndarray, symmetric: bool, shift: float):
    """Linear-interpolation percentiles, at positions moved by ``shift`` (relative) towards the tails."""
    p_hi, p_lo = min(PERCENTILE * (1 + shift), 100.0), (100.0 - PERCENTILE) * (1 - shift)
    if symmetric:
        amax = np.percentile(np.abs(flat), p_hi, axis=-1, method="linear")
        return -amax, amax
    return np.percentile(flat, p_lo, axis=-1, method="linear"), np.percentile(flat, p_hi, axis=-1)


def reference_range(x64: np.ndarray, case: dict) -> BlockRange:
    """Per-block range for minmax and percentile calibration.

    A float32 percentile sits at a position within float32 rounding of ``p/100 (n - 1)``; its
    uncertainty is bracketed by the float64 percentiles at positions moved by that rounding.
    """
    flat = to_blocks(x64, case["block"])
    if case["calibration"] == "minmax":
        return BlockRange(flat.min(axis=-1), flat.max(axis=-1), SCALE_RTOL)
    lo, hi = percentile_range(flat, case["symmetric"], 0.0)
    params = case["bits"], case["signed"], case["symmetric"], case.get("narrow", True)
    outer = percentile_range(flat, case["symmetric"], PERCENTILE_POSITION_RTOL)
    inner = percentile_range(flat, case["symmetric"], -PERCENTILE_POSITION_RTOL)
    scale, _ = reference_scale(lo, hi, *params)
    scale_width = (reference_scale(*outer, *params)[0] - reference_scale(*inner, *params)[0]) / scale
    lo_width = np.abs(np.minimum(outer[0], 0.0) - np.minimum(inner[0], 0.0)) / np.maximum(np.abs(lo), TINY)
    return BlockRange(lo, hi, SCALE_RTOL + np.maximum(scale_width, lo_width))


def reference_scale(lo, hi, bits: int, signed: bool, symmetric: bool, narrow: bool = True):
    """``(S, z)``: the float64 scale and the unrounded zero point ``qmin - lo/S`` (None if symmetric).
    Symmetric: S = amax / qmax (narrow or unsigned), amax / (qmax + 1/2) (full signed range)."""
    qmin, qmax = qrange(bits, signed, symmetric, narrow)
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi)) if signed else np.maximum(hi, 0.0)
        return np.maximum(amax / (qmax if narrow or not signed else qmax + 0.5), TINY), None
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum((hi - lo) / (qmax - qmin), TINY)
    return scale, qmin - lo / scale


def round_with_neighbours(y: np.ndarray, rounding: str, rtol):
    """``(r, a, b, near)``: the rounding of ``y``, and the results on either side of the nearest
    rounding boundary, either of which float32 error may give where ``y`` is ``near`` it."""
    if rounding == "nearest":
        r, boundary = np.round(y), np.floor(y) + 0.5
        a, b = boundary - 0.5, boundary + 0.5
    else:
        boundary = np.round(y)
        r = np.floor(y) if rounding == "floor" else np.ceil(y)
        a, b = (boundary - 1, boundary) if rounding == "floor" else (boundary, boundary + 1)
    near = (np.abs(y - boundary) <= rtol * np.abs(y)) & (y != 0)
    return r, a, b, near


def assert_matches_up_to_boundaries(actual, expected, alt_a, alt_b, ambiguous, what: str):
    """Exact match, except that ``ambiguous`` elements may take either neighbour."""
    ok = np.where(ambiguous, (actual == alt_a) | (actual == alt_b), actual == expected)
    bad = np.argwhere(~ok)
    assert bad.size == 0, (
        f"{what}: {len(bad)} of {actual.size} differ from the reference, first at {tuple(bad[0])}: "
        f"got {actual[tuple(bad[0])]}, expected {expected[tuple(bad[0])]}"
    )


def check_zero_point(zp_lib: np.ndarray, z_real: np.ndarray, lo, scale, rtol, qmin: int, qmax: int):
    """The library's Z is round(z_real) (either neighbour within float32 error of a half)."""
    boundary = np.floor(z_real) + 0.5
    tol = (BOUNDARY_RTOL + 2 * rtol) * (np.abs(np.minimum(lo, 0.0) / scale) + 1.0)
    near = np.abs(z_real - boundary) <= tol
    expected = np.clip(np.round(z_real), qmin, qmax)
    a, b = np.clip(boundary - 0.5, qmin, qmax), np.clip(boundary + 0.5, qmin, qmax)
    assert_matches_up_to_boundaries(zp_lib.astype(np.float64), expected, a, b, near & (a != b), "zero point")
    assert np.sum(near) <= 1 + 0.05 * near.size, f"{np.sum(near)} of {near.size} zero points are ambiguous"


def check_int_quantization(q: qjax.QArray, deq, x: np.ndarray, rng: BlockRange, case: dict):
    """Everything about an integer QArray, given the float64 per-block range."""
    bits, signed, symmetric, rounding = case["bits"], case["signed"], case["symmetric"], case["rounding"]
    block, narrow = case["block"], case.get("narrow", True)
    qmin, qmax = qrange(bits, signed, symmetric, narrow)
    grid = grid_of(x.shape, block)
    scale, z_real = reference_scale(rng.lo, rng.hi, bits, signed, symmetric, narrow)
    rtol = np.broadcast_to(rng.rtol, grid)

    scale_lib = np.asarray(q.scale)
    assert scale_lib.dtype == np.float32 and scale_lib.shape == grid
    scale_error = np.abs(scale_lib - scale) / scale
    assert np.all(scale_error <= rtol), f"scale off by {scale_error.max():.3g} (relative) > {rtol.max():.3g}"

    if symmetric:
        assert q.zero_point is None
        zp = np.zeros(grid)
    else:
        zp_lib = np.asarray(q.zero_point)
        assert zp_lib.dtype == (np.int8 if signed else np.uint8) and zp_lib.shape == grid
        check_zero_point(zp_lib, z_real, rng.lo, scale, rtol, qmin, qmax)
        zp = zp_lib.astype(np.float64)  # validated above; the values below use the same Z

    values = np.asarray(q.values)
    assert values.dtype == (np.int8 if signed else np.uint8) and values.shape == x.shape
    x64 = x.astype(np.float64)
    z_full = repeat_blocks(zp, block)
    y = x64 / repeat_blocks(scale, block)
    tol = BOUNDARY_RTOL + repeat_blocks(rtol, block)
    r, a, b, near = round_with_neighbours(y, rounding, tol)
    r, a, b = (np.clip(v + z_full, qmin, qmax) for v in (r, a, b))
    ambiguous = near & (a != b)
    assert_matches_up_to_boundaries(values.astype(np.float64), r, a, b, ambiguous, "values")

    # A block's extreme may map onto an integer exactly (S = amax/qmax, or a one-sided asymmetric
    # range), so floor/ceil may go either way there; anywhere else an ambiguous element is a
    # coincidence, as rare as its window is narrow.
    flat = to_blocks(x64, block)
    extreme = (x64 == repeat_blocks(flat.min(axis=-1), block)) | (
        x64 == repeat_blocks(flat.max(axis=-1), block)
    )
    interior = ambiguous & ~extreme
    expected_count = np.sum(2 * tol * np.abs(y))
    assert interior.sum() <= min(5 + 3 * expected_count, 0.02 * x.size), (
        f"{interior.sum()} of {x.size} elements are ambiguous"
    )

    # dequantize is (q - Z) * S: exactly in float32, and close to the float64 reference.
    deq = np.asarray(deq)
    assert deq.dtype == np.float32 and deq.shape == x.shape
    exact = (values.astype(np.float32) - z_full.astype(np.float32)) * repeat_blocks(scale_lib, block)
    np.testing.assert_array_equal(deq, exact)
    reference = (values.astype(np.float64) - z_full) * repeat_blocks(scale, block)
    assert np.all(np.abs(deq - reference) <= (repeat_blocks(rtol, block) + 1e-7) * np.abs(reference))


def int_spec(case: dict, **extra) -> qjax.QuantSpec:
    prefix = "int" if case["signed"] else "uint"
    return qjax.QuantSpec(
        dtype=f"{prefix}{case['bits']}",
        symmetric=case["symmetric"],
        narrow_range=case.get("narrow", True),
        rounding=case["rounding"],
        **TILINGS[case["tiling"]].spec_kwargs,
        **extra,
    )


def quantize_eagerly(x: np.ndarray, spec: qjax.QuantSpec):
    # Eager: ~1800 distinct specs would each need a compile under jit; the jitted path is held to
    # the exact float32 reference below.
    q = qjax.quantize(jnp.asarray(x), spec)
    return q, qjax.dequantize(q)


ROUNDINGS = ("nearest", "floor", "ceil")
# Every width from 2 to 8 bits with every sign, symmetry and tiling; the rounding and calibration
# modes crossed with all of those at 2, 4 and 8 bits, and at 3, 5, 6 and 7 bits with nearest rounding
# of the min-max range (widths enter only through qmin and qmax).
INT_CASES = [
    dict(bits=bits, signed=signed, symmetric=symmetric, tiling=tiling, rounding=rounding, calibration=calib)
    for bits, signed, symmetric, tiling, rounding, calib in itertools.product(
        range(2, 9), (True, False), (True, False), TILINGS, ROUNDINGS, ("minmax", "percentile")
    )
    if bits in (2, 4, 8) or (rounding, calib) == ("nearest", "minmax")
]
# The full symmetric signed range (narrow_range=False) at every width, and its rounding and
# calibration modes at 4 bits.
FULL_RANGE_TILINGS = ("per_tensor", "per_channel_last", "per_block_3d")
INT_CASES += [
    dict(
        bits=bits,
        signed=True,
        symmetric=True,
        narrow=False,
        tiling=tiling,
        rounding=rounding,
        calibration=calib,
    )
    for bits, tiling, rounding, calib in itertools.product(
        range(2, 9), FULL_RANGE_TILINGS, ROUNDINGS, ("minmax", "percentile")
    )
    if (rounding, calib) == ("nearest", "minmax") or (bits == 4 and tiling == "per_channel_last")
]


def case_id(case: dict) -> str:
    return "-".join(
        [
            f"{'int' if case['signed'] else 'uint'}{case['bits']}",
            ("sym" if case.get("narrow", True) else "sym_full") if case["symmetric"] else "asym",
            case["tiling"],
            case["rounding"],
            case["calibration"],
        ]
    )


def distribution_for(case: dict) -> str:
    """Rotate the data through every distribution as the bits vary, for every other setting."""
    index = (
        case["bits"]
        + case["signed"]
        + 2 * case["symmetric"]
        + list(TILINGS).index(case["tiling"])
        + ROUNDINGS.index(case["rounding"])
    )
    return DISTRIBUTIONS[index % len(DISTRIBUTIONS)]


@pytest.mark.parametrize("case", INT_CASES, ids=case_id)
def test_integer_quantization_matches_float64_reference(case):
    tiling = TILINGS[case["tiling"]]
    case = dict(case, block=tiling.block)
    x = sample(distribution_for(case), tiling.shape)
    spec = int_spec(case, calibration=case["calibration"], percentile=PERCENTILE)
    q, deq = quantize_eagerly(x, spec)
    check_int_quantization(q, deq, x, reference_range(x.astype(np.float64), case), case)


# ----------------------------------------------------------------------------------------------
# MSE calibration: the grid search, in numpy.


def reference_mse_errors(
    x: np.ndarray, block, bits: int, signed: bool, symmetric: bool, grid: int, narrow: bool = True
):
    """``(ratios, errors)``: the ratios (G - i)/G, i = 0..G-1, and each block's float64 squared error
    of nearest-rounding quantization over the range (c lo, c hi); errors are ``(G,) + grid``."""
    qmin, qmax = qrange(bits, signed, symmetric, narrow)
    flat = to_blocks(x.astype(np.float64), block)
    lo, hi = flat.min(axis=-1), flat.max(axis=-1)
    ratios = (grid - np.arange(grid)) / grid
    errors = []
    for c in ratios:
        scale, z_real = reference_scale(c * lo, c * hi, bits, signed, symmetric, narrow)
        zp = np.zeros_like(scale) if z_real is None else np.clip(np.round(z_real), qmin, qmax)
        s, z = scale[..., None], zp[..., None]
        x_hat = (np.clip(np.round(flat / s) + z, qmin, qmax) - z) * s
        errors.append(np.sum(np.square(flat - x_hat), axis=-1))
    return ratios, np.stack(errors)


MSE_CASES = [
    dict(bits=4, signed=True, symmetric=True, tiling="per_channel_last", rounding="nearest", grid=100),
    dict(bits=4, signed=True, symmetric=False, tiling="per_group_axis0", rounding="nearest", grid=100),
    dict(bits=3, signed=False, symmetric=False, tiling="per_token_2d", rounding="floor", grid=40),
    dict(bits=8, signed=True, symmetric=True, tiling="per_tensor", rounding="ceil", grid=100),
    dict(bits=2, signed=True, symmetric=True, tiling="per_block_3d", rounding="nearest", grid=20),
    dict(bits=4, signed=False, symmetric=True, tiling="per_channel_two_axes", rounding="nearest", grid=17),
    dict(bits=3, signed=True, symmetric=False, tiling="per_group_3d", rounding="nearest", grid=50),
    dict(bits=5, signed=False, symmetric=False, tiling="per_block_2d", rounding="floor", grid=30),
    dict(
        bits=4,
        signed=True,
        symmetric=True,
        narrow=False,
        tiling="per_channel_last",
        rounding="nearest",
        grid=50,
    ),
]


@pytest.mark.parametrize("distribution", ["normal", "heavy_tailed"])
@pytest.mark.parametrize(
    "case", MSE_CASES, ids=lambda c: f"{case_id(dict(c, calibration='mse'))}-{c['grid']}"
)
def test_mse_calibration_matches_numpy_grid_search(case, distribution):
    tiling = TILINGS[case["tiling"]]
    case = dict(case, block=tiling.block)
    bits, signed, symmetric, grid = case["bits"], case["signed"], case["symmetric"], case["grid"]
    narrow = case.get("narrow", True)
    x = sample(distribution, tiling.shape)
    q, deq = quantize_eagerly(x, int_spec(case, calibration="mse", mse_grid=grid))

    _, errors = reference_mse_errors(x, tiling.block, bits, signed, symmetric, grid, narrow)
    best_steps = grid - np.argmin(errors, axis=0)  # first minimum: the larger ratio wins ties
    assert np.any(best_steps < grid), "the search should shrink some block's range for this data"

    # S is proportional to the ratio (the widened range always contains 0), so S / S(1) gives the
    # ratio the library chose: it must lie on the grid and minimise the error up to float32 error.
    flat = to_blocks(x.astype(np.float64), tiling.block)
    lo, hi = flat.min(axis=-1), flat.max(axis=-1)
    full_scale, _ = reference_scale(lo, hi, bits, signed, symmetric, narrow)
    steps = np.asarray(q.scale) / full_scale * grid
    chosen = np.round(steps)
    np.testing.assert_allclose(steps, chosen, rtol=0, atol=1e-3)
    assert np.all((chosen >= 1) & (chosen <= grid))
    chosen_error = np.take_along_axis(errors, (grid - chosen).astype(int)[None], axis=0)[0]
    least, second = np.partition(errors, 1, axis=0)[:2]
    assert np.all(chosen_error <= least * (1 + 1e-4)), "a ratio with a larger error was chosen"
    clear = second > least * (1 + 1e-4)  # no near-tie: the choice is unique
    np.testing.assert_array_equal(chosen[clear], best_steps[clear])
    assert np.mean(clear) > 0.5

    c = chosen / grid
    check_int_quantization(q, deq, x, BlockRange(c * lo, c * hi, SCALE_RTOL), case)


# ----------------------------------------------------------------------------------------------
# Float32 reference: the same float32 operations in the same order give the same bits.


def float32_scale(x: np.ndarray, case: dict) -> np.ndarray:
    """Minmax scale in float32: amax * fl(2/(qmax - qmin)) (signed) or amax * fl(1/qmax)
    (unsigned), or (hi/2 - lo/2) * fl(2/L)."""
    f32 = np.float32
    qmin, qmax = qrange(case["bits"], case["signed"], case["symmetric"], case.get("narrow", True))
    flat = to_blocks(x, case["block"])
    lo, hi = flat.min(axis=-1), flat.max(axis=-1)
    if case["symmetric"]:
        amax = np.maximum(np.abs(lo), np.abs(hi)) if case["signed"] else np.maximum(hi, f32(0))
        return np.maximum(amax * f32(2 / (qmax - qmin) if case["signed"] else 1 / qmax), f32(TINY))
    lo, hi = np.minimum(lo, f32(0)), np.maximum(hi, f32(0))
    return np.maximum((hi * f32(0.5) - lo * f32(0.5)) * f32(2 / (qmax - qmin)), f32(TINY))


def float32_values(x: np.ndarray, scale: np.ndarray, case: dict):
    """``(values, zero_point)`` from a float32 ``scale``, computed in float32 numpy."""
    block, f32 = case["block"], np.float32
    qmin, qmax = qrange(case["bits"], case["signed"], case["symmetric"], case.get("narrow", True))
    if case["symmetric"]:
        zp = np.zeros(scale.shape, np.int32)
    else:
        lo = np.minimum(to_blocks(x, block).min(axis=-1), f32(0))
        zp = np.clip(f32(qmin) - np.round(lo * (f32(1) / scale)), qmin, qmax).astype(np.int32)
    rounding = {"nearest": np.round, "floor": np.floor, "ceil": np.ceil}[case["rounding"]]
    with np.errstate(over="ignore"):  # x / TINY overflows to inf (an all-negative unsigned block)
        y = x * repeat_blocks(f32(1) / scale, block)
    y = np.where(np.abs(y) < f32(TINY), np.copysign(f32(0), y), y)  # XLA on CPU flushes subnormals to 0
    rounded = rounding(y)
    rounded = np.clip(rounded, qmin - 256, qmax + 256)  # the clip below decides; keeps the cast defined
    return np.clip(rounded.astype(np.int32) + repeat_blocks(zp, block), qmin, qmax), zp


quantize_to_qarray_jit = jax.jit(qjax.quantize, static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def quantize_jit(x: jax.Array, spec: qjax.QuantSpec):
    q = qjax.quantize(x, spec)
    return q.values, q.scale, q.zero_point, qjax.dequantize(q)


def check_float32_exact(x: np.ndarray, case: dict):
    """Within one jit: dequantize uses the scale stored in the QArray; given that scale, the zero
    point and the values are exact float32 arithmetic (x * fl(1/S)); and the scale is exact too."""
    values_lib, scale_lib, zp_lib, deq = (
        None if a is None else np.asarray(a) for a in quantize_jit(jnp.asarray(x), int_spec(case))
    )
    block = case["block"]
    z_lib = np.zeros(scale_lib.shape, np.float32) if zp_lib is None else zp_lib.astype(np.float32)
    stored = (values_lib.astype(np.float32) - repeat_blocks(z_lib, block)) * repeat_blocks(scale_lib, block)
    np.testing.assert_array_equal(deq, stored, err_msg="dequantize(q) != (q.values - Z) * q.scale")

    values, zp = float32_values(x, scale_lib, case)
    if case["symmetric"]:
        assert zp_lib is None
    else:
        np.testing.assert_array_equal(zp_lib, zp, err_msg="Z != round(qmin - lo / S)")
    np.testing.assert_array_equal(values_lib, values, err_msg="q != clip(round(x * fl(1/S)) + Z)")
    np.testing.assert_array_equal(scale_lib, float32_scale(x, case))


EXACT_CASES = [
    dict(bits=8, signed=True, symmetric=True, tiling="per_channel_last", rounding="nearest"),
    dict(bits=4, signed=False, symmetric=False, tiling="per_group_axis0", rounding="floor"),
    dict(bits=3, signed=True, symmetric=False, tiling="per_block_3d", rounding="ceil"),
    dict(bits=8, signed=False, symmetric=True, tiling="per_token_3d", rounding="nearest"),
    dict(bits=5, signed=True, symmetric=False, tiling="per_tensor", rounding="nearest"),
    dict(bits=2, signed=True, symmetric=True, tiling="per_group_axis1", rounding="floor"),
    dict(bits=8, signed=True, symmetric=True, narrow=False, tiling="per_channel_last", rounding="nearest"),
    dict(bits=3, signed=True, symmetric=True, narrow=False, tiling="per_block_3d", rounding="ceil"),
]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: case_id(dict(c, calibration="minmax")))
def test_jitted_quantization_equals_float32_reference_exactly(case, distribution):
    tiling = TILINGS[case["tiling"]]
    check_float32_exact(sample(distribution, tiling.shape), dict(case, block=tiling.block))


@given(
    x=hnp.arrays(np.float32, SHAPE_2D, elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
    index=st.sampled_from(range(len(EXACT_CASES))),
)
def test_jitted_quantization_equals_float32_reference_on_drawn_values(x, index):
    case = EXACT_CASES[index]
    if TILINGS[case["tiling"]].shape != SHAPE_2D:
        case = dict(case, tiling="per_channel_first")
    check_float32_exact(x, dict(case, block=TILINGS[case["tiling"]].block))


@pytest.mark.parametrize("case", EXACT_CASES[:2], ids=lambda c: case_id(dict(c, calibration="minmax")))
def test_integer_scale_is_the_documented_float32_product(case):
    # S = amax * fl(1/qmax) (or (hi/2 - lo/2) * fl(2/L)), the same eagerly and under jit.
    tiling = TILINGS[case["tiling"]]
    case = dict(case, block=tiling.block)
    x = sample("normal", tiling.shape)
    _, scale, _, _ = quantize_jit(jnp.asarray(x), int_spec(case))
    np.testing.assert_array_equal(np.asarray(scale), float32_scale(x, case))
    np.testing.assert_array_equal(
        np.asarray(qjax.quantize(jnp.asarray(x), int_spec(case)).scale), np.asarray(scale)
    )


# ----------------------------------------------------------------------------------------------
# fp8 / fp4 with a float32 scale per block.

FLOAT_DTYPES = {
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float4_e2m1fn": ml_dtypes.float4_e2m1fn,
}
FLOAT_TILINGS = ("per_tensor", "per_channel_last", "per_channel_two_axes")


def saturating_cast(y: np.ndarray, dtype) -> np.ndarray:
    """Float32 ``y`` clipped to the format's range and cast (round to nearest even), as float32."""
    fmax = np.float32(ml_dtypes.finfo(dtype).max)
    return np.clip(y, -fmax, fmax).astype(dtype).astype(np.float32)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("tiling_name", FLOAT_TILINGS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_float_format_values_are_saturated_casts(dtype, tiling_name, distribution):
    tiling = TILINGS[tiling_name]
    x = sample(distribution, tiling.shape)
    spec = qjax.QuantSpec(dtype=dtype, **tiling.spec_kwargs)
    values, scale, zp, deq = quantize_jit(jnp.asarray(x), spec)
    assert zp is None and values.dtype == FLOAT_DTYPES[dtype] and values.shape == x.shape

    fmax = float(ml_dtypes.finfo(FLOAT_DTYPES[dtype]).max)
    amax = np.abs(to_blocks(x, tiling.block)).max(axis=-1)
    scale = np.asarray(scale)
    assert scale.dtype == np.float32 and scale.shape == grid_of(x.shape, tiling.block)
    np.testing.assert_allclose(scale, amax.astype(np.float64) / fmax, rtol=SCALE_RTOL, atol=0)
    np.testing.assert_array_max_ulp(scale, amax / np.float32(fmax), maxulp=1)  # exact: see below

    expected = saturating_cast(x / repeat_blocks(scale, tiling.block), FLOAT_DTYPES[dtype])
    got = np.asarray(values).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(got).max() == fmax  # each block's absolute maximum lands on the largest value
    np.testing.assert_array_equal(np.asarray(deq), got * repeat_blocks(scale, tiling.block))


# ----------------------------------------------------------------------------------------------
# MX (E8M0 power-of-two scale per 32 elements) and NVFP4 (fp8 scale per 16, float32 tensor scale).

MX_LAYOUTS = {  # shape, axis, block
    "2d_axis0": ((64, 48), 0, (32, 1)),
    "2d_axis1": ((48, 64), 1, (1, 32)),
    "3d_axis1": (SHAPE_3D, 1, (1, 32, 1)),
}
MX_ELEMENTS = {"mxfp8": (ml_dtypes.float8_e4m3fn, 8), "mxfp4": (ml_dtypes.float4_e2m1fn, 2)}


def mx_data(distribution: str, shape: tuple[int, ...]) -> np.ndarray:
    if shape == (48, 64):
        return np.ascontiguousarray(sample(distribution, (64, 48)).T)
    return sample(distribution, shape)


def mx_exponent(amax: np.ndarray, emax: int, fmax: float, rounding: str) -> np.ndarray:
    """The shared exponent k of S = 2^k, float64 and exact. ``floor``: floor(log2 amax) - emax (the
    OCP rule). ``ceil``: ceil(log2(amax / fmax)), the smallest k with amax / 2^k <= fmax."""
    _, e = np.frexp(amax)  # amax = m 2^e with m in [0.5, 1): floor(log2 amax) = e - 1, exactly
    k = e - 1 - emax
    if rounding == "ceil":
        k = k + (amax > fmax * np.exp2(k))  # amax / 2^k lies in [2^emax, 2^(emax + 1)): one step at most
    return np.clip(k, -127, 127)


def check_mx(x: np.ndarray, fmt: str, axis: int, block: tuple[int, ...], rounding: str = "floor"):
    element, emax = MX_ELEMENTS[fmt]
    fmax = float(ml_dtypes.finfo(element).max)
    spec = qjax.QuantSpec(
        dtype=fmt, granularity="per_group", axis=axis, group_size=32, mx_scale_rounding=rounding
    )
    values, scale, zp, deq = quantize_jit(jnp.asarray(x), spec)
    assert zp is None and values.dtype == element

    amax = np.abs(to_blocks(x, block)).max(axis=-1).astype(np.float64)
    expected_scale = np.exp2(mx_exponent(amax, emax, fmax, rounding))
    scale = np.asarray(scale)
    assert scale.dtype == ml_dtypes.float8_e8m0fnu and scale.shape == grid_of(x.shape, block)
    np.testing.assert_array_equal(scale.astype(np.float64), expected_scale)
    if rounding == "ceil":  # nothing saturates, and half the scale would saturate the maximum
        assert np.all(amax / expected_scale <= fmax)
        assert np.all((amax / expected_scale * 2 > fmax) | (amax == 0))

    scale_full = repeat_blocks(expected_scale.astype(np.float32), block)
    expected = saturating_cast(x / scale_full, element)
    got = np.asarray(values).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(deq), got * scale_full)
    return amax / expected_scale > fmax  # the blocks whose maximum scales past fmax


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("layout", MX_LAYOUTS)
@pytest.mark.parametrize("fmt", MX_ELEMENTS)
def test_mx_scales_are_powers_of_two_and_values_saturated_casts(fmt, layout, distribution):
    shape, axis, block = MX_LAYOUTS[layout]
    check_mx(mx_data(distribution, shape), fmt, axis, block)


@pytest.mark.parametrize("distribution", ["normal", "heavy_tailed", "positive"])  # uniform: |x| < 3
@pytest.mark.parametrize("fmt", MX_ELEMENTS)
def test_mx_ceil_exponent_never_saturates(fmt, distribution):
    shape, axis, block = MX_LAYOUTS["2d_axis0"]
    x = mx_data(distribution, shape)
    assert not np.any(check_mx(x, fmt, axis, block, "ceil"))
    saturated = check_mx(x, fmt, axis, block, "floor")
    assert np.any(saturated)  # where the OCP rule saturates a block maximum, ceil moved it


@pytest.mark.parametrize("rounding", ["floor", "ceil"])
@pytest.mark.parametrize("fmt", MX_ELEMENTS)
def test_mx_scale_exponent_is_exact_next_to_powers_of_two(fmt, rounding):
    # floor(log2 amax) for amax one ulp below, at, and one ulp above 2^k: float32 log2 rounds
    # log2(2^k (1 - 2^-24)) up to k, but the exponent must stay k - 1. ceil: amax = fmax 2^k exactly
    # and one ulp either side of it.
    shape, axis, block = MX_LAYOUTS["2d_axis0"]
    fmax = np.float32(ml_dtypes.finfo(MX_ELEMENTS[fmt][0]).max)
    edges = np.exp2(np.arange(-16, 16, dtype=np.float32)) * (fmax if rounding == "ceil" else np.float32(1))
    maxima = np.stack([np.nextafter(edges, np.float32(0)), edges, np.nextafter(edges, np.float32(np.inf))])
    maxima = maxima.reshape(grid_of(shape, block))
    # |uniform / 4| <= 0.75, so every other element of a block stays below its maximum.
    x = sample("uniform", shape) / np.float32(4) * repeat_blocks(maxima, block)
    x[0, :], x[32, :] = maxima[0], -maxima[1]
    check_mx(x, fmt, axis, block, rounding)


NVFP4_LAYOUTS = {
    "2d_axis0": ((64, 48), 0, (16, 1)),
    "2d_axis1": ((64, 48), 1, (1, 16)),
    "3d_last": (SHAPE_3D, -1, (1, 1, 16)),
}


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("layout", NVFP4_LAYOUTS)
def test_nvfp4_two_level_scales_and_values(layout, distribution):
    shape, axis, block = NVFP4_LAYOUTS[layout]
    x = sample(distribution, shape)
    spec = qjax.QuantSpec(dtype="nvfp4", granularity="per_group", axis=axis)
    q = quantize_to_qarray_jit(jnp.asarray(x), spec)
    f32 = np.float32

    amax = np.abs(to_blocks(x, block)).max(axis=-1)
    tensor_scale = np.asarray(q.tensor_scale)
    assert tensor_scale.dtype == np.float32 and tensor_scale.shape == ()
    np.testing.assert_allclose(tensor_scale, amax.max().astype(np.float64) / (448 * 6), rtol=SCALE_RTOL)
    np.testing.assert_array_equal(tensor_scale, amax.max() * f32(1 / (448 * 6)))

    block_scale = np.asarray(q.scale)
    assert block_scale.dtype == ml_dtypes.float8_e4m3fn and block_scale.shape == grid_of(shape, block)
    inverse = f32(1) / (f32(6) * tensor_scale)
    expected_block = np.clip(amax * inverse, f32(0), f32(448)).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(block_scale.astype(np.float32), expected_block.astype(np.float32))

    scale = repeat_blocks(np.maximum(expected_block.astype(f32) * tensor_scale, f32(TINY)), block)
    got = np.asarray(q.values).astype(f32)
    np.testing.assert_array_equal(got, saturating_cast(x * (f32(1) / scale), ml_dtypes.float4_e2m1fn))
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), got * scale)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float4_e2m1fn", "nvfp4"])
def test_float_scale_is_the_documented_float32_product(dtype):
    # S = amax * fl(1/fmax) and S_t = amax * fl(1/(448 * 6)) (see the integer test above).
    x = sample("normal", SHAPE_2D)
    if dtype == "nvfp4":  # one tensor scale per row: 64 tensors of 48 elements
        spec = qjax.QuantSpec(dtype=dtype, granularity="per_group", axis=0)
        scale = jax.jit(jax.vmap(lambda row: qjax.quantize(row, spec).tensor_scale))(jnp.asarray(x))
        expected = np.abs(x).max(axis=1) * np.float32(1 / (448 * 6))
    else:
        spec = qjax.QuantSpec(dtype=dtype, granularity="per_channel", axis=-1)
        fmax = np.float32(ml_dtypes.finfo(FLOAT_DTYPES[dtype]).max)
        scale = quantize_jit(jnp.asarray(x), spec)[1]
        expected = np.abs(x).max(axis=0, keepdims=True) * np.float32(1 / fmax)
    np.testing.assert_array_equal(np.asarray(scale), expected)
