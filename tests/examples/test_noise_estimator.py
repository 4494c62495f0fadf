"""The ``noise`` example estimator: in training ``x + S u`` with ``u ~ U[-1/2, 1/2)`` from the key
(against numpy, the same draws), so ``|x_hat - x| <= S/2`` with zero-mean uniform noise; identity
gradient; without a key (evaluation) the nearest-rounding value a served layer computes."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import qjax
from qjax.numerics import QuantSpec


def step_reference(x, spec):
    """float32 numpy: each column's scale, ``S = fl(max|x| * fl(1/qmax))`` (symmetric signed), or
    ``fl((max - min) / 2 * fl(2/(qmax - qmin)))`` with the range widened to 0 (asymmetric)."""
    x = np.asarray(x, np.float32)
    fmt = spec.format
    qmin, qmax = fmt.qrange(spec.symmetric)
    if spec.symmetric:
        amax = np.max(np.abs(x), axis=0) if fmt.signed else np.maximum(np.max(x, axis=0), 0)
        s = amax * np.float32(1.0 / qmax)
    else:
        lo, hi = np.minimum(np.min(x, axis=0), 0), np.maximum(np.max(x, axis=0), 0)
        s = (hi * np.float32(0.5) - lo * np.float32(0.5)) * np.float32(1.0 / ((qmax - qmin) / 2))
    return np.maximum(s, np.finfo(np.float32).tiny)[None, :]


FAKE_QUANT = jax.jit(qjax.fake_quant, static_argnums=(1, 2))  # one compilation per spec


@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    x=arrays(np.float32, (12, 3), elements=st.floats(-1e3, 1e3, width=32)),
    dtype=st.sampled_from(["int2", "int4", "int8", "uint4"]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_training_value_is_x_plus_one_step_of_uniform_noise(plugin, x, dtype, symmetric, seed):
    plugin("noise_estimator")
    spec = QuantSpec(dtype=dtype, granularity="per_channel", axis=-1, symmetric=symmetric)
    key = jax.random.key(seed)
    x_hat = np.asarray(FAKE_QUANT(jnp.asarray(x), spec, "noise", key=key), np.float64)
    s = step_reference(x, spec)
    u = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -0.5, 0.5), np.float64)
    x64 = np.asarray(x, np.float64)
    ref = x64 + s.astype(np.float64) * u  # float64; the estimator rounds to float32 (once or twice)
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    ulp = np.maximum(ulp, np.finfo(np.float32).tiny)  # XLA's CPU code flushes subnormals to 0
    assert np.all(np.abs(x_hat - ref) <= ulp)
    assert np.all(np.abs(x_hat - x64) <= s / 2 + ulp)


def test_the_noise_is_uniform_with_mean_zero(plugin):
    plugin("noise_estimator")
    spec = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
    x = jax.random.normal(jax.random.key(0), (4000, 8), jnp.float32)
    x_hat = qjax.fake_quant(x, spec, "noise", key=jax.random.key(1))
    u = (np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)) / step_reference(x, spec)
    n = u.size
    assert np.all(np.abs(u) <= 0.5 + 1e-5)
    assert abs(np.mean(u)) < 4 * np.sqrt(1 / 12 / n)  # mean 0 (4 sigma)
    assert np.var(u) == pytest.approx(1 / 12, rel=0.03)
    quarters = np.histogram(u, bins=4, range=(-0.5, 0.5))[0] / n
    np.testing.assert_allclose(quarters, 0.25, atol=0.01)


def test_the_gradient_is_the_identity(plugin):
    plugin("noise_estimator")
    spec = QuantSpec(dtype="int4")
    x = jax.random.normal(jax.random.key(2), (16, 4), jnp.float32)
    c = jax.random.normal(jax.random.key(3), (16, 4), jnp.float32)
    for key in (jax.random.key(4), None):
        grad = jax.grad(lambda x, key=key: jnp.sum(c * qjax.fake_quant(x, spec, "noise", key=key)))(x)
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(c))


def test_without_a_key_the_value_is_the_nearest_rounding_serving_computes(plugin):
    plugin("noise_estimator")
    spec = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
    x = jax.random.normal(jax.random.key(5), (16, 4), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(qjax.fake_quant(x, spec, "noise")), np.asarray(qjax.quantize_dequantize(x, spec))
    )
    qp = qjax.calibrate(x * 0.5, spec)  # static parameters: the step comes from them
    key = jax.random.key(6)
    got = np.asarray(qjax.fake_quant(x, spec, "noise", key=key, qparams=qp))
    u = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, -0.5, 0.5))
    np.testing.assert_array_equal(got, np.asarray(x) + np.asarray(qp.scale) * u)


def test_a_quantized_model_trains_with_noise_and_evaluates_on_the_grid(plugin):
    plugin("noise_estimator")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(16, 8, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)

    w4 = {"dtype": "int4", "granularity": "per_channel", "axis": -1}
    noisy = qjax.nn.quantize_model(
        Net(nnx.Rngs(0)), [qjax.nn.Rule(path=".*", weights=w4, weight_estimator="noise")]
    )
    plain = qjax.nn.quantize_model(Net(nnx.Rngs(0)), [qjax.nn.Rule(path=".*", weights=w4)])
    x = jax.random.normal(jax.random.key(7), (4, 16), jnp.float32)
    assert not np.array_equal(np.asarray(noisy(x)), np.asarray(plain(x)))
    noisy.eval()
    np.testing.assert_array_equal(np.asarray(noisy(x)), np.asarray(plain(x)))


def test_only_integer_formats_have_one_step(plugin):
    noise_estimator = plugin("noise_estimator")
    with pytest.raises(
        ValueError, match=r"estimator 'noise' adds one step of an integer grid; dtype='float8_e4m3fn'"
    ):
        noise_estimator.noise_injection(
            jnp.ones(4), QuantSpec(dtype="float8_e4m3fn"), key=jax.random.key(0), qparams=None
        )
