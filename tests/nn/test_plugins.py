"""Plug-ins inside quantized models: an estimator that draws noise gets a key stream in training and
gives its evaluation value after ``model.eval()``; the integer forward runs only for estimators that
declare it; a plug-in format is served weight-only; the histogram observer refuses a plug-in
calibration instead of ignoring it."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import numerics
from qjax.nn import Rule
from qjax.nn.integer_qat import supports_integer_forward
from qjax.numerics.spec import CALIBRATIONS
from qjax.ste import ESTIMATORS
from tests.numerics.test_registry import Ternary

W4 = {"dtype": "int4", "granularity": "per_channel", "axis": -1}


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def jitter(x, spec, *, key, qparams):
    """``Q(x)`` without a key; with one, ``Q(x) + 0.01 u`` (identity gradient)."""
    x_hat = qjax.quantize_dequantize(x, spec, qparams=qparams)
    if key is not None:
        x_hat = x_hat + 0.01 * jax.random.uniform(key, x.shape, x.dtype)
    return jax.lax.stop_gradient(x_hat) + (x - jax.lax.stop_gradient(x))


@pytest.fixture
def plugins():
    qjax.register_estimator("jitter", jitter, needs_key=True)
    qjax.register_estimator(
        "ste_like", lambda x, spec, *, key, qparams: qjax.fake_quant(x, spec, "ste", qparams=qparams)
    )
    qjax.register_estimator(
        "ste_int",
        lambda x, spec, *, key, qparams: qjax.fake_quant(x, spec, "ste", qparams=qparams),
        integer_forward=True,
    )
    yield
    for name in ("jitter", "ste_like", "ste_int"):
        ESTIMATORS.unregister(name)


def model(**rule):
    return qjax.nn.quantize_model(Net(nnx.Rngs(0)), [Rule(path=".*", **rule)])


def test_a_noise_drawing_estimator_gets_keys_in_training_and_none_in_evaluation(plugins):
    x = jax.random.normal(jax.random.key(1), (4, 16), jnp.float32)
    noisy = model(weights=W4, weight_estimator="jitter")
    reference = model(weights=W4)  # ste: Q(w)
    first, second = noisy(x), noisy(x)
    assert not np.array_equal(np.asarray(first), np.asarray(second))  # a fresh key per call
    assert np.max(np.abs(np.asarray(first - reference(x)))) > 0
    noisy.eval()
    np.testing.assert_array_equal(np.asarray(noisy(x)), np.asarray(reference(x)))
    noisy.train()
    assert not np.array_equal(np.asarray(noisy(x)), np.asarray(reference(x)))
    noisy.eval()
    served = qjax.nn.convert(noisy)  # serving: the spec's own (nearest) rounding
    np.testing.assert_allclose(np.asarray(served(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-5)


def test_estimators_without_a_key_leave_the_model_as_it_was(plugins):
    plain = model(weights=W4, weight_estimator="ste_like")
    assert not hasattr(plain.fc.dot_general, "deterministic") and plain.fc.dot_general.rngs is None
    x = jax.random.normal(jax.random.key(1), (4, 16), jnp.float32)
    np.testing.assert_array_equal(np.asarray(plain(x)), np.asarray(model(weights=W4)(x)))


def test_the_integer_forward_runs_only_for_estimators_that_declare_it(plugins):
    w, a = qjax.QuantSpec(dtype="int8"), qjax.QuantSpec(dtype="int8")
    assert supports_integer_forward(w, a, ("ste", "clipped_ste"))
    assert not supports_integer_forward(w, a, ("ste_like", "ste"))
    assert not supports_integer_forward(w, a, ("jitter", "ste"))
    assert supports_integer_forward(w, a, ("ste_int", "ste"))
    x = jax.random.normal(jax.random.key(2), (4, 16), jnp.float32)
    rule = dict(weights={"dtype": "int8"}, activations={"dtype": "int8"})
    integer = model(**rule, weight_estimator="ste_int")
    lowered = jax.jit(lambda m, x: m(x)).lower(integer, x).as_text()
    assert "xi8>) -> tensor<" in lowered  # an int8 x int8 contraction
    simulated = jax.jit(lambda m, x: m(x)).lower(model(**rule, weight_estimator="ste_like"), x).as_text()
    assert "xi8>) -> tensor<" not in simulated
    np.testing.assert_allclose(
        np.asarray(integer(x)), np.asarray(model(**rule, integer_forward=False)(x)), rtol=1e-5, atol=1e-5
    )


class TernaryNN(Ternary):
    name = "ternary_nn"


def test_a_plug_in_format_is_trained_and_served_weight_only():
    numerics.register_format(TernaryNN())
    try:
        m = model(weights={**W4, "dtype": "ternary_nn"})
        x = jax.random.normal(jax.random.key(3), (4, 16), jnp.float32)
        kernel = m.fc.kernel[...]
        expected = (
            x @ qjax.quantize_dequantize(kernel, qjax.QuantSpec(**{**W4, "dtype": "ternary_nn"}))
            + m.fc.bias[...][None, :]
        )
        np.testing.assert_allclose(np.asarray(m(x)), np.asarray(expected), rtol=1e-6, atol=1e-6)
        served = qjax.nn.convert(m)
        assert isinstance(served.fc.kernel[...], qjax.QArray) and served.fc.kernel[...].packed
        np.testing.assert_allclose(np.asarray(served(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)
        with pytest.raises(
            ValueError, match=r"no low-precision contraction of int8 activations with ternary_nn"
        ):
            qjax.nn.convert(model(weights={**W4, "dtype": "ternary_nn"}, activations={"dtype": "int8"}))(x)
    finally:
        numerics.formats.FORMATS.unregister("ternary_nn")


def test_the_histogram_observer_refuses_a_plug_in_calibration():
    numerics.register_calibration(
        "absmean3_nn", lambda b, s: (-3 * jnp.mean(jnp.abs(b), -1), 3 * jnp.mean(jnp.abs(b), -1))
    )
    try:
        m = model(
            weights=W4,
            activations={"dtype": "int8", "calibration": "absmean3_nn"},
            activation_scale="static",
            observer="histogram",
        )
        x = jax.random.normal(jax.random.key(4), (4, 16), jnp.float32)
        with pytest.raises(
            ValueError, match=r"calibration='absmean3_nn' \(a plug-in\) reads a tensor, not a histogram"
        ):
            qjax.nn.calibrate(m, [x])
    finally:
        CALIBRATIONS.unregister("absmean3_nn")
