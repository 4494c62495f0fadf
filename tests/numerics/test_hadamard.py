"""Hadamard matrices: H H^T = n I exactly in integers (Sylvester, Paley I and II, Kronecker products),
the factor plans, clear refusals, the randomized rotation, and the fast transform against the
float64 dense product."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.numerics import (
    hadamard,
    hadamard_factors,
    hadamard_transform,
    is_hadamard_order,
    random_hadamard,
)

# Sylvester; Paley I (12, 20, 44, 104 = 103 + 1); Paley II (28, 36); Kronecker products of them
ORDERS = [1, 2, 4, 64, 12, 20, 44, 104, 28, 36, 24, 48, 96, 160, 576, 1536]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_is_exact_in_integers(n):
    h = hadamard(n)
    assert h.shape == (n, n) and h.dtype == np.int64
    assert set(np.unique(h)) <= {-1, 1}
    hf = h.astype(np.float64)  # integer sums below 2^53: float64 products are exact (and BLAS-fast)
    np.testing.assert_array_equal(hf @ hf.T, n * np.eye(n))
    assert math.prod(hadamard_factors(n)) == n and is_hadamard_order(n)


def test_factor_plans_are_the_cheapest_kronecker_products():
    assert hadamard_factors(1) == ()
    assert hadamard_factors(576) == (12, 12, 4)  # not 36 x 16: 28 operations per element, not 52
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(4096) == (64, 64)  # Sylvester factors of at most 128
    assert hadamard_factors(14336) == (28, 32, 16)  # Paley II q = 13
    # row-major Kronecker order: H_576 = H_12 (x) H_12 (x) H_4
    np.testing.assert_array_equal(hadamard(48), np.kron(hadamard(12), hadamard(4)))


@pytest.mark.parametrize(
    "n, nearest",
    [(3, "2 or 4"), (6, "4 or 8"), (10, "8 or 12"), (52, "48 or 56"), (172, "168 or 176")],
)
def test_orders_without_a_construction_are_refused_with_the_nearest(n, nearest):
    assert not is_hadamard_order(n)
    message = rf"no Hadamard matrix of order n={n} is built here.*nearest built are {nearest}"
    with pytest.raises(ValueError, match=message):
        hadamard(n)
    with pytest.raises(ValueError, match=rf"order n={n}"):
        hadamard_transform(jnp.ones((2, n)))


@pytest.mark.parametrize("n", [0, -4, 1.5, True])
def test_orders_must_be_positive_integers(n):
    assert not is_hadamard_order(n)
    with pytest.raises(ValueError, match="a Hadamard order is a positive integer"):
        hadamard_factors(n)


def test_random_hadamard_is_orthogonal_sign_flips_then_hadamard():
    n = 96
    q = random_hadamard(n, seed=3)
    assert q.shape == (n, n) and q.dtype == np.float64
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-13)
    signs = np.sign(q[:, 0] * hadamard(n)[:, 0])  # Q = diag(s) H / sqrt(n): s_i = row i's sign
    np.testing.assert_allclose(q, signs[:, None] * hadamard(n) / math.sqrt(n), rtol=1e-15)
    assert 0 < np.sum(signs > 0) < n  # both signs drawn
    np.testing.assert_array_equal(random_hadamard(n, seed=3), q)
    assert not np.array_equal(random_hadamard(n, seed=4), q)


@pytest.mark.parametrize("n", [12, 96, 576, 1536])
def test_transform_matches_the_float64_dense_product(n):
    x = np.random.default_rng(n).normal(size=(2, 3, n)).astype(np.float32)
    ref = x.astype(np.float64) @ hadamard(n) / math.sqrt(n)
    got = jax.jit(hadamard_transform)(jnp.asarray(x))
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    with jax.enable_x64(True):
        got64 = hadamard_transform(jnp.asarray(x, jnp.float64))
        assert got64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got64), ref, rtol=0, atol=1e-13 * np.abs(ref).max())


def test_transform_keeps_low_precision_dtypes_and_huge_finite_inputs_finite():
    n, c = 48, 1e38 / math.sqrt(48)
    x = c * hadamard(n)[:, 5].astype(np.float64)  # x H / sqrt(n) = c sqrt(n) e_5: representable
    y = hadamard_transform(jnp.asarray(x[None], jnp.float32))  # a sum before scaling would be c n
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(np.asarray(y[0], np.float64), c * math.sqrt(n) * np.eye(n)[5], atol=1e32)
    assert hadamard_transform(jnp.ones((2, 12), jnp.bfloat16)).dtype == jnp.bfloat16


@given(
    n=st.sampled_from([12, 20, 48]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-20, 1e20),
)
def test_transform_is_orthogonal_and_undone_by_the_transpose(n, seed, scale):
    x = np.random.default_rng(seed).normal(size=(4, n)) * scale
    y = np.asarray(hadamard_transform(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    back = y @ hadamard(n).T / math.sqrt(n)
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5 * np.abs(x).max())


def test_transform_refuses_what_it_cannot_rotate():
    with pytest.raises(TypeError, match="needs a floating x; got int32"):
        hadamard_transform(jnp.ones((2, 12), jnp.int32))
    with pytest.raises(ValueError, match="got a scalar"):
        hadamard_transform(jnp.float32(1.0))
