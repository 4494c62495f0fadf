"""Granularity as blocks: groups over several consecutive axes (a conv kernel's H, W, I)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec, SpecError


@pytest.mark.parametrize("group", [8, 16, 48, 144])
def test_flattened_conv_groups_match_float64(group):
    """``axis=(0, 1, 2)``: groups of ``group`` consecutive elements of the kernel's flattened H*W*I,
    per output channel; the float64 reference quantizes the (H*W*I, O) matrix group by group."""
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 16, 8))
    spec = QuantSpec(dtype="int4", granularity="per_group", axis=(0, 1, 2), group_size=group)
    got = np.asarray(qjax.quantize_dequantize(kernel, spec), np.float64)
    flat = np.asarray(kernel, np.float64).reshape(-1, group, 8)  # (groups, group, O)
    scale = np.max(np.abs(flat), axis=1, keepdims=True) / 7
    ref = (np.clip(np.round(flat / scale), -7, 7) * scale).reshape(3, 3, 16, 8)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_flattened_groups_that_straddle_rows_are_refused_with_the_sizes_that_fit():
    spec = QuantSpec(dtype="int4", granularity="per_group", axis=(0, 1, 2), group_size=32)
    with pytest.raises(ValueError, match=r"use one of \[1, 2, 4, 8, 16, 48, 144\]"):
        qjax.quantize(jnp.ones((3, 3, 16, 8)), spec)
    with pytest.raises(ValueError, match=r"axis=\(0, 1, 2\) groups the flattened H\*W\*I = 144"):
        qjax.quantize(
            jnp.ones((3, 3, 16, 8)), QuantSpec(dtype="int4", granularity="per_group", axis=2, group_size=32)
        )
    with pytest.raises(SpecError, match="consecutive axes"):
        QuantSpec(dtype="int4", granularity="per_group", axis=(0, 2), group_size=8)


@pytest.mark.parametrize(
    ("shape", "block", "axes"),
    [
        ((64, 128), (64, 1), (0,)),  # per output channel
        ((256, 64), (1, 64), (1,)),  # per token
        ((4, 8, 8, 1), (1, 8, 8, 1), (1, 2)),  # per example of an image batch (the size-1 axis stays)
        ((16, 32), (16, 32), (0, 1)),  # per tensor
        ((16, 32), (1, 1), ()),  # per element
        ((16, 32), (16, 8), None),  # groups: tiled
    ],
)
def test_spanned_axes(shape, block, axes):
    assert qjax.numerics.tiling.spanned_axes(shape, block) == axes


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(dtype="int8", granularity="per_channel", axis=-1),
        QuantSpec(dtype="int8", granularity="per_channel", axis=0),
        QuantSpec(dtype="int8", granularity="per_token"),
        QuantSpec(dtype="uint8", symmetric=False),
        QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=8),
    ],
)
def test_block_ranges_reduced_in_place_match_float64(spec):
    """Per-channel, per-token and per-tensor ranges are reduced over the tensor's own axes, the
    others over the tiled view; both give each block's exact extremes."""
    x = jax.random.normal(jax.random.key(1), (24, 16)) * jnp.arange(1, 17, dtype=jnp.float32)[None]
    block = qjax.numerics.tiling.block_shape(x.shape, spec)
    lo, hi = qjax.numerics.calibration.block_range(x, spec, block)
    grid = qjax.numerics.tiling.grid_shape(x.shape, block)
    t = np.asarray(x, np.float64).reshape(qjax.numerics.tiling.tiled_shape(x.shape, block))
    inner = (1, 3)
    if spec.symmetric:
        want_hi = np.max(np.abs(t), axis=inner)
        want_lo = -want_hi
    else:
        want_lo, want_hi = np.min(t, axis=inner), np.max(t, axis=inner)
    assert lo.shape == hi.shape == grid
    np.testing.assert_array_equal(np.asarray(lo, np.float64), want_lo)
    np.testing.assert_array_equal(np.asarray(hi, np.float64), want_hi)
