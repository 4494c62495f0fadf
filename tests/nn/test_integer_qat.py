"""QAT with an integer forward pass: same values (up to float rounding) and same gradients as the
simulated fake-quant forward it replaces."""

import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.nn import Rule

INT_DOT = re.compile(
    r"stablehlo\.dot_general .*: \(tensor<[0-9x]+xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>"
)


class Linear(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Linear(32, 48, rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


class Narrow(nnx.Module):
    """More input than output features: the backward pass moves the input's scale onto the
    cotangent, the smaller operand (a wide layer dequantizes the input instead)."""

    def __init__(self, rngs):
        self.layer = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


class Einsum(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Einsum("bd,dnh->bnh", (32, 4, 8), rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


# One quantized layer per model: both paths see the same input, so a float-rounding difference
# cannot move a later quantizer across a rounding boundary.
CASES = {
    "int8 per-channel x int8 per-token, ste": dict(
        weights=qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1),
        activations=qjax.QuantSpec(dtype="int8", granularity="per_token"),
    ),
    "int4 g16 x uint8 asymmetric, clipped_ste": dict(
        weights=qjax.QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=16),
        activations=qjax.QuantSpec(dtype="uint8", symmetric=False, calibration="percentile", percentile=99.0),
        weight_estimator="clipped_ste",
        activation_estimator="clipped_ste",
    ),
    "int6 per-tensor x int4 static": dict(
        weights=qjax.QuantSpec(dtype="int6"),
        activations=qjax.QuantSpec(dtype="int4"),
        activation_scale="static",
    ),
}


def pair(case, net):
    """The same quantized model with the integer and with the simulated forward."""
    fields = dict(CASES[case])
    if net is Einsum:
        fields["weights"] = qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=(1, 2))
    models = []
    for integer in (True, False):
        q = qjax.nn.quantize_model(net(nnx.Rngs(0)), [Rule(path="layer", integer_forward=integer, **fields)])
        if fields.get("activation_scale") == "static":
            qjax.nn.calibrate(q, [jax.random.normal(jax.random.key(3), (16, 32))])
        models.append(q)
    return models


def loss(model, x):
    return jnp.sum(jnp.square(model(x)))


@pytest.mark.parametrize("batch", [16, 64])  # 64: the cotangent outgrows the kernel
@pytest.mark.parametrize("net", [Linear, Narrow, Einsum], ids=["linear", "narrow", "einsum"])
@pytest.mark.parametrize("case", list(CASES))
def test_integer_forward_matches_simulated_values_and_gradients(case, net, batch):
    integer, simulated = pair(case, net)
    x = jax.random.normal(jax.random.key(1), (batch, 32)) + 0.3
    value_and_grad = nnx.jit(nnx.value_and_grad(loss))
    v_int, g_int = value_and_grad(integer, x)
    v_sim, g_sim = value_and_grad(simulated, x)
    y_int, y_sim = np.asarray(integer(x)), np.asarray(simulated(x))
    assert np.max(np.abs(y_int - y_sim)) <= 1e-5 * np.max(np.abs(y_sim))
    np.testing.assert_allclose(v_int, v_sim, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_int), jax.tree.leaves(g_sim), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-4 * np.max(np.abs(b)))
    assert any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(g_int))


def test_integer_forward_lowers_to_int8_dots_and_lsq_stays_simulated():
    integer, simulated = pair("int8 per-channel x int8 per-token, ste", Linear)
    x = jnp.ones((16, 32))

    def hlo(model):
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()

    assert len(INT_DOT.findall(hlo(integer))) >= 1
    assert not INT_DOT.search(hlo(simulated))
    lsq = Rule(
        path=".*",
        weights=qjax.QuantSpec(dtype="int8"),
        activations=qjax.QuantSpec(dtype="int8"),
        weight_estimator="lsq",
        activation_estimator="lsq",
    )
    assert not INT_DOT.search(hlo(qjax.nn.quantize_model(Linear(nnx.Rngs(0)), [lsq])))


def test_original_residuals_backward_uses_the_float_operands():
    """ste_residuals='original': dx = mask * (g w^T), dw = mask * (x^T g) with the float x and w."""
    fields = dict(
        weights=qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1),
        activations=qjax.QuantSpec(dtype="int8", calibration="percentile", percentile=90.0),
        weight_estimator="ste",
        activation_estimator="clipped_ste",
        ste_residuals="original",
    )
    q = qjax.nn.quantize_model(Linear(nnx.Rngs(0)), [Rule(path="layer", **fields)])
    x = jax.random.normal(jax.random.key(2), (16, 32))
    g = jax.random.normal(jax.random.key(4), (16, 48))
    grads = nnx.grad(lambda m, x: jnp.sum(m(x) * g), argnums=(0, 1))(q, x)
    w = np.asarray(q.layer.kernel[...], np.float64)
    xs = np.asarray(x, np.float64)
    amax = np.percentile(np.abs(xs), 90.0)
    # the clipped-STE mask of the activation quantizer: |round(x / S)| <= 127 with S = amax / 127
    inside = np.abs(xs) / (amax / 127) < 127.5
    g64 = np.asarray(g, np.float64)
    np.testing.assert_allclose(np.asarray(grads[1]), inside * (g64 @ w.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads[0].layer.kernel[...]), xs.T @ g64, rtol=1e-5, atol=1e-5)


def test_bad_ste_residuals_is_named():
    with pytest.raises(ValueError, match="ste_residuals='float' must be 'quantized' or 'original'"):
        Rule(path=".*", ste_residuals="float")


BACKWARD_DOT = re.compile(r"stablehlo\.dot_general .*: \(tensor<([0-9x]+)x(\w+)>, tensor<([0-9x]+)x(\w+)>\)")


@pytest.mark.parametrize("residuals", ["quantized", "original"])
def test_bf16_layer_runs_its_backward_contractions_in_bf16(residuals):
    """A bf16 layer's dL/dx and dL/dW contract in bf16, as its float backward would (the scale
    outer products, with a contraction of size 1, aside), and agree with the f32 layer's gradient
    of the same quantized forward to bf16 precision: dx = g Q(w)^T, dw = Q(x)^T g."""
    rule = Rule(
        path="layer",
        weights=qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1),
        activations=qjax.QuantSpec(dtype="int8", granularity="per_token"),
        ste_residuals=residuals,
    )
    x = jax.random.normal(jax.random.key(1), (16, 32))
    g = jax.random.normal(jax.random.key(2), (16, 48))
    grads, texts = {}, {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = Linear(nnx.Rngs(0))
        nnx.update(model, jax.tree.map(lambda a, d=dtype: a.astype(d), nnx.state(model, nnx.Param)))
        q = qjax.nn.quantize_model(model, [rule])
        graphdef, params, rest = nnx.split(q, nnx.Param, ...)
        f = lambda p, x, gd=graphdef, r=rest: jnp.sum(
            nnx.merge(gd, p, r, copy=True)(x).astype(jnp.float32) * g
        )
        grad = jax.jit(jax.grad(f, argnums=(0, 1)))
        xd = x.astype(dtype)
        texts[dtype] = grad.trace(params, xd).lower().as_text()
        p, dx = grad(params, xd)
        grads[dtype] = (np.asarray(dx, np.float64), np.asarray(p["layer"]["kernel"][...], np.float64))
    contractions = [
        (m.group(2), m.group(4))
        for m in BACKWARD_DOT.finditer(texts[jnp.bfloat16])
        if m.group(2) != "i8" and not m.group(1).endswith("x1")
    ]
    assert contractions and set(contractions) == {("bf16", "bf16")}, contractions
    for b16, f32 in zip(grads[jnp.bfloat16], grads[jnp.float32], strict=True):
        assert np.max(np.abs(b16 - f32)) <= 2e-2 * np.max(np.abs(f32))
