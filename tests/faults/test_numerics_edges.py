"""Edges of the numerics API: zero-size tensors (one clear error from every quantizer), NaN and
Inf under ``jit`` (every format makes the values that share a scale with them NaN, and leaves the
other blocks alone), step sizes that are not positive, booleans given as sizes, and a model that
is not a module."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec

ROW_BLOCKS = {  # each row of a (2, 32) tensor is one scale block (or, for nvfp4, shares a tensor scale)
    "int8 per token": QuantSpec(dtype="int8", granularity="per_token"),
    "uint4 asym g32": QuantSpec(
        dtype="uint4", symmetric=False, granularity="per_group", axis=-1, group_size=32
    ),
    "fp8 per token": QuantSpec(dtype="float8_e4m3fn", granularity="per_token"),
    "fp4 per token": QuantSpec(dtype="float4_e2m1fn", granularity="per_token"),
    "mxfp4": QuantSpec(dtype="mxfp4", granularity="per_group", axis=-1),
    "mxfp8": QuantSpec(dtype="mxfp8", granularity="per_group", axis=-1),
    "nvfp4": QuantSpec(dtype="nvfp4", granularity="per_group", axis=-1),
}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", sorted(ROW_BLOCKS))
def test_a_non_finite_value_makes_its_scale_block_nan_under_jit(name, bad):
    spec = ROW_BLOCKS[name]
    x = np.linspace(-2, 2, 64, dtype=np.float32).reshape(2, 32)
    x[0, 5] = bad
    for fn in (qjax.quantize_dequantize, qjax.fake_quant):
        y = np.asarray(jax.jit(lambda v, fn=fn: fn(v, spec))(jnp.asarray(x)))
        assert np.isnan(y[0]).all(), (fn.__name__, y[0])
        if name == "nvfp4":  # its float32 tensor scale is shared by every block
            assert np.isnan(y[1]).all()
        else:
            np.testing.assert_array_equal(
                y[1], np.asarray(qjax.quantize_dequantize(jnp.asarray(x[1:]), spec))[0]
            )


ZERO_SPECS = [*ROW_BLOCKS.values(), QuantSpec(dtype="int4"), QuantSpec(dtype="kmeans2")]


@pytest.mark.parametrize("spec", ZERO_SPECS, ids=lambda s: s.dtype)
@pytest.mark.parametrize("shape", [(0, 32), (3, 0), (0,)])
def test_zero_size_tensors_get_one_clear_error(spec, shape):
    x = jnp.zeros(shape, jnp.float32)
    calls = {
        "quantize": lambda: qjax.quantize(x, spec),
        "quantize_dequantize": lambda: qjax.quantize_dequantize(x, spec),
        "calibrate": lambda: qjax.calibrate(x, spec),
    }
    if spec.dtype != "kmeans2":
        calls["fake_quant"] = lambda: qjax.fake_quant(x, spec)
    for call in calls.values():
        with pytest.raises(
            ValueError, match=rf"x has shape {re.escape(str(shape))}, no elements to quantize"
        ):
            call()


def test_a_step_size_that_is_not_positive_is_refused():
    spec = QuantSpec(dtype="int4")
    x = jnp.ones((4, 8))
    for scale in (0.0, -0.5):
        with pytest.raises(ValueError, match=r"scale must be > 0 everywhere .*smallest entry is"):
            qjax.fake_quant(x, spec, estimator="lsq", scale=jnp.float32(scale))
    qjax.fake_quant(x, spec, estimator="lsq", scale=jnp.float32(0.1))


@pytest.mark.parametrize("field", ["group_size", "mse_grid", "kmeans_iters"])
def test_booleans_are_not_sizes(field):
    kwargs = {"group_size": dict(granularity="per_group", axis=-1)}.get(field, {})
    with pytest.raises((ValueError, TypeError), match=rf"{field}=True|group_size=<positive int>.*got True"):
        QuantSpec(dtype="int4", **kwargs, **{field: True})


def test_quantize_model_needs_a_module():
    with pytest.raises(TypeError, match=r"quantize_model needs a flax NNX module .*got int"):
        qjax.nn.quantize_model(42, [qjax.nn.Rule(path=".*", weights=QuantSpec(dtype="int8"))])
