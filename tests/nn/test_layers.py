"""LinearGeneral and ConvTranspose: quantized, converted and served like Linear and Conv."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec
from qjax.nn import Rule

W8 = QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
A8_TOKEN = QuantSpec(dtype="int8", granularity="per_token")
A8 = QuantSpec(dtype="int8")
forward = nnx.jit(lambda m, x: m(x))


def _reference_fake_quant(x, axes):
    """float64 symmetric int8 fake quantization with one scale per slice reduced over ``axes``."""
    x = np.asarray(x, np.float64)
    amax = np.max(np.abs(x), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1.0)
    return np.clip(np.round(x / scale), -127, 127) * scale


def test_linear_general_over_two_axes_matches_float64_and_serves_in_int8():
    """(B, T, H, D) x (H, D, N): a per-token input scale spans both contracted axes."""
    layer = nnx.LinearGeneral((4, 8), 6, axis=(-2, -1), rngs=nnx.Rngs(0))
    q = qjax.nn.quantize_model(layer, [Rule(path=".*", weights=W8, activations=A8_TOKEN)])
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 8))
    fake = forward(q, x)
    xh = _reference_fake_quant(x, (2, 3))
    wh = _reference_fake_quant(layer.kernel[...], (0, 1))
    ref = np.einsum("bthd,hdn->btn", xh, wh) + np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(np.asarray(fake, np.float64), ref, rtol=1e-5, atol=1e-5)
    served = qjax.nn.convert(q)
    np.testing.assert_allclose(np.asarray(forward(served, x)), np.asarray(fake), rtol=1e-5, atol=1e-5)
    hlo = jax.jit(lambda x: served(x)).lower(x).as_text()
    assert "xi8>, tensor<" in hlo and "-> tensor<2x3x6xi32>" in hlo.replace("\n", " ")


def test_linear_general_with_dot_general_cls_is_refused():
    layer = nnx.LinearGeneral(8, 4, dot_general_cls=lambda: jax.lax.dot_general, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dot_general_cls"):
        qjax.nn.quantize_model(layer, [Rule(path=".*", weights=W8)])


@pytest.mark.parametrize("static", [False, True])
def test_conv_transpose_qat_calibrate_serve(static):
    layer = nnx.ConvTranspose(4, 6, (3, 3), strides=(2, 2), rngs=nnx.Rngs(0))
    rule = Rule(path=".*", weights=W8, activations=A8, activation_scale="static" if static else "dynamic")
    q = qjax.nn.quantize_model(layer, [rule])
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 4))
    if static:
        q = qjax.nn.calibrate(q, [x])
    fake = forward(q, x)
    # the float64 reference: both operands on their int8 grids, then Flax's own transpose conv
    xh = _reference_fake_quant(x, (0, 1, 2, 3))
    wh = _reference_fake_quant(layer.kernel[...], (0, 1, 2))
    ref_layer = nnx.clone(layer)
    ref_layer.kernel.set_value(jnp.asarray(wh, jnp.float32))
    ref = forward(ref_layer, jnp.asarray(xh, jnp.float32))
    np.testing.assert_allclose(np.asarray(fake), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(fake - layer(x)).max()) > 1e-4  # quantization is visible
    served = qjax.nn.convert(q)
    assert isinstance(served.kernel[...], qjax.QArray)
    np.testing.assert_allclose(np.asarray(forward(served, x)), np.asarray(fake), rtol=1e-5, atol=1e-5)
