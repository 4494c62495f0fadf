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
