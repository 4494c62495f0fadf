"""Linen models: a transformer block and a CNN quantized by rules, QAT to integer serving."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax import SpecError
from qjax.nn import Rule
from tests.nn.test_attention import contractions

A8 = {"dtype": "int8", "granularity": "per_token"}
W8 = {"dtype": "int8", "granularity": "per_channel", "axis": -1}
RULES = [Rule(path=".*attn", kind="attention", activations=A8), Rule(path=".*", weights=W8, activations=A8)]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(x.shape[-1], name="down")(nn.gelu(nn.Dense(64, name="up")(h)))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        x = nn.DenseGeneral(6, axis=(-3, -2, -1), name="proj")(x)  # contracts H, W, C at once
        return nn.Dense(4, name="head")(x)


@pytest.fixture(scope="module")
def block():
    model = Block()
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    return model, model.init(jax.random.key(1), x), x


def test_linen_block_qat_convert_serve(block, caplog):
    model, variables, x = block
    forward = qjax.nn.linen.quantized_apply(model, RULES)
    fake = jax.jit(forward)(variables, x)
    float_out = model.apply(variables, x)
    assert float(jnp.abs(fake - float_out).max()) > 1e-4  # quantization is visible

    def loss(params):
        return jnp.mean(forward({"params": params}, x) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert float(jnp.abs(grads["attn"]["query"]["kernel"]).max()) > 0
    params = optax.apply_updates(variables["params"], jax.tree.map(lambda g: -1e-3 * g, grads))
    trained = {"params": params}

    with caplog.at_level(logging.WARNING, logger="qjax"):
        served = qjax.nn.linen.convert(model, trained, RULES, x)
    assert sorted(qjax.nn.linen.served_kernels(served)) == sorted(
        f"{p}/kernel" for p in ("attn/query", "attn/key", "attn/value", "attn/out", "up", "down")
    )
    # the norms are the only parameters left in float, and the warning says so
    assert "LayerNorm_0: parameters bias, scale outside the layers qjax hooks" in caplog.text
    serve = jax.jit(qjax.nn.linen.quantized_apply(model, RULES, "serve"))
    out = serve(served, x)
    fake = jax.jit(forward)(trained, x)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(fake), rtol=1e-4, atol=1e-4 * float(jnp.abs(fake).max())
    )
    real = [c for c in contractions(jax.make_jaxpr(serve)(served, x).jaxpr) if c[2] > 1]
    assert len(real) == 4 + 2 + 2, real  # q, k, v, out projections; QK^T, PV; up, down
    assert all(dtypes == ("int8", "int8") for _, dtypes, _ in real), real


def test_linen_cnn_with_dense_general_over_three_axes():
    model = CNN()
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    variables = model.init(jax.random.key(3), x)
    rules = [
        Rule(path="conv", weights=W8, activations={"dtype": "int8"}),
        Rule(path=".*", weights=W8, activations=A8),
    ]
    fake = jax.jit(qjax.nn.linen.quantized_apply(model, rules))(variables, x)
    served = qjax.nn.linen.convert(model, variables, rules, x)
    serve = jax.jit(qjax.nn.linen.quantized_apply(model, rules, "serve"))
    np.testing.assert_allclose(np.asarray(serve(served, x)), np.asarray(fake), rtol=1e-4, atol=1e-5)
    real = [c for c in contractions(jax.make_jaxpr(serve)(served, x).jaxpr) if c[2] > 1]
    assert [name for name, _, _ in real].count("conv") == 1 and len(real) == 3
    assert all(dtypes == ("int8", "int8") for _, dtypes, _ in real), real


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(weights=W8, weight_estimator="lsq"), "weight_estimator"),
        (dict(activations=A8, activation_estimator="pact"), "activation_estimator"),
        (dict(activations={"dtype": "int8"}, activation_scale="static"), "activation_scale"),
        (dict(weights={"dtype": "int8", "rounding": "stochastic"}), "weights"),
        (dict(weights=W8, gradients={"dtype": "int8"}), "gradients"),
        (dict(weights={"dtype": "float8_e4m3fn"}, amax_history=4), "amax_history"),
    ],
)
def test_linen_refuses_stateful_rules(fields, field):
    with pytest.raises(SpecError, match="Linen") as info:
        qjax.nn.linen.quantized_apply(Block(), [Rule(path=".*", **fields)])
    assert info.value.field == field
