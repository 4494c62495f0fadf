"""LLM.int8(): with no outliers it is plain vector-wise int8 (checked against qjax.quantize and a
float64 product of the integer values and scales), with threshold 0 the float matmul, with outlier
features the float part plus the int8 part of the rest (far more accurate than plain int8); the
NNX hook matches the functional version; zero inputs, jit, outlier statistics and errors."""

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.methods.llm_int8 import (
    LLMInt8DotGeneral,
    apply_llm_int8,
    llm_int8_matmul,
    outlier_mask,
    outlier_stats,
)

EPS32 = float(np.finfo(np.float32).eps)
PER_TOKEN = qjax.QuantSpec(dtype="int8", granularity="per_token")
PER_CHANNEL = qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
OUTLIERS = [3, 20, 41]


def f64(x):
    return np.asarray(x, np.float64)


def data(rng, t=128, k=64, n=48, factor=30.0):
    x = rng.normal(size=(t, k)).astype(np.float32)
    x[:, OUTLIERS] *= factor
    return x, (0.1 * rng.normal(size=(k, n))).astype(np.float32)


def vectorwise_int8_reference(x, w):
    """float64: (int8 x per token) @ (int8 w per output channel) times the outer product of scales."""
    qx, qw = qjax.quantize(jnp.asarray(x), PER_TOKEN), qjax.quantize(jnp.asarray(w), PER_CHANNEL)
    sx, sw = f64(qx.scale), f64(qw.scale)  # (T, 1), (1, N)
    return (f64(qx.values) @ f64(qw.values)) * sx * sw


def rel_error(y, y_ref):
    return np.linalg.norm(f64(y) - y_ref) / np.linalg.norm(y_ref)


@pytest.mark.parametrize("threshold", [math.inf, 1e6])
def test_no_outliers_is_vectorwise_int8(rng, threshold):
    x, w = data(rng)
    y = llm_int8_matmul(x, w, threshold=threshold)
    ref = vectorwise_int8_reference(x, w)
    # int32 accumulation is exact; the only rounding is float32's in S_x S_w and acc * scale
    assert np.all(np.abs(f64(y) - ref) <= 2 * EPS32 * np.abs(ref)), np.abs(f64(y) - ref).max()


def test_threshold_zero_is_the_float_matmul(rng):
    x, w = data(rng)
    y = llm_int8_matmul(x, w, threshold=0.0)
    ref = f64(x) @ f64(w)
    bound = x.shape[1] * EPS32 * (np.abs(f64(x)) @ np.abs(f64(w)))  # float32 summation
    assert np.all(np.abs(f64(y) - ref) <= bound)
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.matmul(x, w)), rtol=1e-5, atol=1e-5)


def test_outliers_take_the_float_path(rng):
    x, w = data(rng)
    mask = np.asarray(outlier_mask(x, 6.0))
    assert np.flatnonzero(mask).tolist() == OUTLIERS
    y = llm_int8_matmul(x, w)
    regular = np.where(mask[None, :], 0.0, x).astype(np.float32)
    w_regular = np.where(mask[:, None], 0.0, w).astype(np.float32)
    ref = f64(x[:, mask]) @ f64(w[mask]) + vectorwise_int8_reference(regular, w_regular)
    bound = 4 * EPS32 * (np.abs(f64(x)) @ np.abs(f64(w)))
    assert np.all(np.abs(f64(y) - ref) <= bound)


def test_outlier_error_far_below_plain_int8(rng):
    x, w = data(rng)
    y_float = f64(x) @ f64(w)
    mixed = rel_error(llm_int8_matmul(x, w), y_float)
    plain = rel_error(llm_int8_matmul(x, w, threshold=math.inf), y_float)
    # measured (seed 0): 0.0013 vs 0.017, about 13x lower
    assert mixed * 5 < plain, (mixed, plain)


def test_leading_axes_jit_and_dtype(rng):
    x, w = data(rng)
    x3 = x.reshape(4, 32, 64)
    y3 = llm_int8_matmul(x3, w)
    assert y3.shape == (4, 32, 48)
    np.testing.assert_array_equal(np.asarray(y3).reshape(128, 48), np.asarray(llm_int8_matmul(x, w)))
    y_jit = jax.jit(lambda a, b: llm_int8_matmul(a, b, threshold=6.0))(x3, w)
    np.testing.assert_array_equal(np.asarray(y_jit), np.asarray(y3))
    y16 = llm_int8_matmul(x.astype(jnp.bfloat16), w)
    assert y16.dtype == jnp.bfloat16


def test_zero_and_extreme_inputs_are_finite(rng):
    _, w = data(rng)
    for threshold in (6.0, 0.0, math.inf):
        y = llm_int8_matmul(np.zeros((5, 64), np.float32), w, threshold=threshold)
        np.testing.assert_array_equal(np.asarray(y), 0.0)
    x = np.zeros((4, 64), np.float32)
    x[1, 7] = 1e30  # one enormous outlier: float path; the others stay int8
    y = llm_int8_matmul(x, w)
    assert np.all(np.isfinite(np.asarray(y)))
    y = llm_int8_matmul(np.full((3, 64), 1e-40, np.float32), w)  # subnormal activations
    assert np.all(np.isfinite(np.asarray(y)))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def test_nnx_integration_matches_functional(rng):
    model = MLP(nnx.Rngs(0))
    x, _ = data(rng, t=16)
    int8_model = nnx.clone(model)
    assert apply_llm_int8(int8_model, threshold=6.0) == 2
    assert isinstance(int8_model.up.dot_general, LLMInt8DotGeneral)
    up, down = model.up, model.down
    h = nnx.relu(llm_int8_matmul(x, up.kernel[...]) + up.bias[...][None, :])
    ref = llm_int8_matmul(h, down.kernel[...]) + down.bias[...][None, :]
    np.testing.assert_array_equal(np.asarray(int8_model(x)), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, b: m(b))(int8_model, x)), np.asarray(ref))
    assert rel_error(int8_model(x), f64(model(x))) < 0.02  # and close to the float model
    # only the matching layers; the layer argument of nnx.Linear
    partial = nnx.clone(model)
    assert apply_llm_int8(partial, path_regex="down") == 1
    assert not isinstance(partial.up.dot_general, LLMInt8DotGeneral)
    layer = nnx.Linear(64, 8, dot_general=LLMInt8DotGeneral(6.0), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(
        np.asarray(layer(x)), np.asarray(llm_int8_matmul(x, layer.kernel[...]) + layer.bias[...][None, :])
    )


def test_outlier_stats(rng):
    x, _ = data(rng)
    st = outlier_stats(x.reshape(2, 64, 64), threshold=6.0)
    a = np.abs(f64(x))
    m = a.max(0)
    assert st["n_outlier_features"] == 3 and st["outlier_features"] == OUTLIERS
    assert st["outlier_fraction"] == 3 / 64
    assert st["token_fraction"] == float((a >= 6.0).any(axis=1).mean())
    assert st["max_abs"] == m.max() and st["median_abs"] == np.median(a)
    assert st["median_channel_absmax"] == np.median(m)
    assert st["max_over_median"] == pytest.approx(m.max() / np.median(m))
    zero = outlier_stats(np.zeros((4, 8), np.float32))
    assert zero["n_outlier_features"] == 0 and zero["max_over_median"] == 1.0


def test_bad_inputs_raise_clear_errors(rng):
    x, w = data(rng, t=4)
    with pytest.raises(TypeError, match="x has dtype int32"):
        llm_int8_matmul(np.ones((4, 64), np.int32), w)
    with pytest.raises(ValueError, match=r"x has shape \(4, 63\) but w has shape \(64, 48\)"):
        llm_int8_matmul(x[:, :63], w)
    with pytest.raises(ValueError, match=r"w has shape \(64,\); llm_int8_matmul needs a kernel \(K, N\)"):
        llm_int8_matmul(x, w[:, 0])
    with pytest.raises(ValueError, match=r"threshold=-1\.0 must be a number >= 0"):
        llm_int8_matmul(x, w, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold=nan must be a number >= 0"):
        LLMInt8DotGeneral(math.nan)
    with pytest.raises(ValueError, match="x holds 4 NaN or Inf"):
        llm_int8_matmul(np.where(np.arange(64) == 2, np.nan, x).astype(np.float32), w)
    with pytest.raises(ValueError, match=r"contracts x \(\.\.\., K\) with a kernel \(K, N\)"):
        LLMInt8DotGeneral()(jnp.asarray(x), jnp.asarray(w.T), (((0,), (1,)), ((), ())))
    model = MLP(nnx.Rngs(0))
    msg = r"path_regex='attn' matches no nnx\.Linear layer; Linear paths: down, up"
    with pytest.raises(ValueError, match=msg):
        apply_llm_int8(model, path_regex="attn")
    with pytest.raises(ValueError, match=r"path_regex='\(' is not a valid regular expression"):
        apply_llm_int8(model, path_regex="(")
    rules = [qjax.nn.Rule(path=".*", weights=PER_CHANNEL)]
    with pytest.raises(ValueError, match=r"layer '(up|down)' is already quantized"):
        apply_llm_int8(qjax.nn.quantize_model(model, rules))
    with pytest.raises(ValueError, match=r"x has shape \(\); outlier_stats needs"):
        outlier_stats(np.float32(1.0))
