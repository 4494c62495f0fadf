"""The ``dorefa`` example estimator against a float64 numpy reference of DoReFa-Net's weight
quantizer, and its gradient (straight through the rounding, exact through tanh and the maximum)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.numerics import QuantSpec


def reference(w, bits, per_channel):
    """float64: ``n = tanh w / (2 max|tanh w|) + 1/2``, ``2 round((2^k - 1) n) / (2^k - 1) - 1``;
    also ``n (2^k - 1)`` (to find values a float32 computation may round the other way)."""
    t = np.tanh(np.asarray(w, np.float64))
    peak = np.max(np.abs(t), axis=0, keepdims=True) if per_channel else np.max(np.abs(t))
    levels = 2**bits - 1
    scaled = (t / (2 * peak) + 0.5) * levels
    return 2 * np.round(scaled) / levels - 1, scaled


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_matches_the_float64_formula(plugin, bits, per_channel):
    plugin("dorefa")
    fields = {"granularity": "per_channel", "axis": -1} if per_channel else {}
    spec = QuantSpec(dtype=f"int{bits}", **fields)
    w = jax.random.normal(jax.random.key(bits), (64, 6), jnp.float32) * 0.7
    got = np.asarray(jax.jit(qjax.fake_quant, static_argnums=(1, 2))(w, spec, "dorefa"), np.float64)
    ref, scaled = reference(w, bits, per_channel)
    near_tie = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-4
    assert np.all(np.abs(got - ref)[~near_tie] <= 1e-6)
    assert np.all(np.abs(got - ref)[near_tie] <= 2 / (2**bits - 1) + 1e-6)  # one level at most
    assert near_tie.mean() < 0.01
    levels = np.unique(np.round((got + 1) / 2 * (2**bits - 1), 4))
    assert np.all(levels == np.round(levels)) and len(levels) <= 2**bits
    peaks = np.max(np.abs(got), axis=0) if per_channel else np.max(np.abs(got))
    assert np.all(peaks == 1.0)  # each block's largest |w| maps to -1 or +1


def test_gradient_is_straight_through_the_rounding_and_exact_elsewhere(plugin):
    """With ``t = tanh w`` and ``m = max|t|`` (at ``j``), the differentiable part of ``w_hat`` is
    ``t / m``: ``dL/dw_i = c_i (1 - t_i^2) / m - [i = j] sign(t_j) (1 - t_j^2) / m^2 sum_k c_k t_k``."""
    plugin("dorefa")
    spec = QuantSpec(dtype="int3")
    w = jax.random.normal(jax.random.key(0), (10, 3), jnp.float32)
    c = jax.random.normal(jax.random.key(1), (10, 3), jnp.float32)
    grad = np.asarray(jax.grad(lambda w: jnp.sum(c * qjax.fake_quant(w, spec, "dorefa")))(w), np.float64)
    t = np.tanh(np.asarray(w, np.float64))
    c64 = np.asarray(c, np.float64)
    j = np.unravel_index(np.argmax(np.abs(t)), t.shape)
    m = np.abs(t[j])
    ref = c64 * (1 - t**2) / m
    ref[j] -= np.sign(t[j]) * (1 - t[j] ** 2) / m**2 * np.sum(c64 * t)
    np.testing.assert_allclose(grad, ref, rtol=2e-5, atol=1e-6)


def test_only_integer_formats_give_the_bits(plugin):
    plugin("dorefa")
    with pytest.raises(ValueError, match=r"estimator 'dorefa' quantizes to 2\^k levels; dtype='mxfp4'"):
        qjax.fake_quant(
            jnp.ones((4, 32)), QuantSpec(dtype="mxfp4", granularity="per_group", axis=-1), "dorefa"
        )
