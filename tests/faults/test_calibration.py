"""Faults in calibration (``qjax.nn.calibrate``): a batch holding NaN or Inf, activations that
overflow inside the model, and a model left in training mode. Each is refused or warned about, so
static scales are never non-finite and a converted model never outputs NaN on clean input."""

import warnings

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec
from qjax.nn import Rule

INT8 = QuantSpec(dtype="int8")


class Net(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.fc1(x))))


def quantized(dropout=0.0):
    rule = Rule(path=".*", weights=INT8, activations=INT8, activation_scale="static")
    model = Net(nnx.Rngs(0), dropout)
    model.eval()
    return qjax.nn.quantize_model(model, [rule])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_batch_is_refused(bad):
    model = quantized()
    clean = np.ones((5, 4), np.float32)
    dirty = clean.copy()
    dirty[2, 1] = bad
    with pytest.raises(ValueError, match=r"calibration batch 1 holds 1 non-finite values"):
        qjax.nn.calibrate(model, [jnp.asarray(clean), jnp.asarray(dirty)])


def test_overflow_inside_the_model_names_the_layer():
    model = quantized()
    huge = jnp.full((2, 4), 3e38, jnp.float32)  # finite; fc1's sums overflow to inf
    with pytest.raises(ValueError, match=r"layer 'fc2': its calibration statistics are not finite"):
        qjax.nn.calibrate(model, [huge])


def test_clean_calibration_gives_finite_outputs_and_no_warning():
    model = quantized()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qjax.nn.calibrate(model, [x])
    assert bool(jnp.isfinite(qjax.nn.convert(model)(x)).all())


def test_training_mode_is_warned_about():
    model = quantized(dropout=0.5)
    model.train()
    x = jnp.ones((2, 4), jnp.float32)
    with pytest.warns(UserWarning, match=r"calibrate: drop in training mode .*call model.eval\(\) first"):
        qjax.nn.calibrate(model, [x])
