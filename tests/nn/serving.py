"""Models and helpers of the serving parity tests (``tests/nn/test_serve.py``,
``tests/kernels/test_dispatch.py``): layer-by-layer inputs, so each served layer is compared with
its fake-quant forward on the same input."""

import itertools

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax import QuantSpec
from qjax.nn import Rule

INT8_CH = QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
INT4_CH = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
INT4_G16 = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=16)
FP8_CH = QuantSpec(dtype="float8_e4m3fn", granularity="per_channel", axis=-1)
A8_TOKEN = QuantSpec(dtype="int8", granularity="per_token")
A8_TENSOR = QuantSpec(dtype="int8")
AU8_ASYM = QuantSpec(dtype="uint8", symmetric=False)
FP8_TOKEN = QuantSpec(dtype="float8_e4m3fn", granularity="per_token")
FP8_TENSOR = QuantSpec(dtype="float8_e4m3fn")

# (activation spec, activation_scale) of the four layers of each parity model
INT8_ACTS = [(A8_TOKEN, "dynamic"), (A8_TENSOR, "dynamic"), (A8_TENSOR, "static"), (AU8_ASYM, "static")]
FP8_ACTS = [(FP8_TOKEN, "dynamic"), (FP8_TENSOR, "dynamic"), (FP8_TENSOR, "static"), (FP8_TOKEN, "dynamic")]


# --- models: ``inputs(x)`` gives each layer's input, ``each(xs)`` applies each layer to its own ---


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, widths=(32, 32, 32, 32, 16)):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(widths)])

    def inputs(self, x):
        xs = [x]
        for i in range(len(self.layers) - 1):
            xs.append(jax.nn.gelu(self.layers[i](xs[-1])))  # gelu keeps some negatives: Z != 0
        return xs

    def each(self, xs):
        return [layer(x) for layer, x in zip(self.layers, xs, strict=True)]

    def __call__(self, x):
        return self.layers[-1](self.inputs(x)[-1])


class CNN(MLP):
    """SAME stride 2, VALID, SAME, VALID stride 2 on 12x12x4 inputs."""

    def __init__(self, rngs: nnx.Rngs):
        conv = lambda cin, stride, padding: nnx.Conv(
            cin, 8, (3, 3), strides=stride, padding=padding, rngs=rngs
        )
        self.layers = nnx.List(
            [conv(4, 2, "SAME"), conv(8, 1, "VALID"), conv(8, 1, "SAME"), conv(8, 2, "VALID")]
        )


class Attention(MLP):
    """Four ``btd,dnh->btnh`` projections of the same input."""

    def __init__(self, rngs: nnx.Rngs):
        proj = lambda: nnx.Einsum("btd,dnh->btnh", (32, 2, 8), (2, 8), rngs=rngs)
        self.layers = nnx.List([proj() for _ in range(4)])

    def inputs(self, x):
        return [x] * 4

    def __call__(self, x):
        return self.each(self.inputs(x))


class Embeds(MLP):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Embed(40, 32, rngs=rngs) for _ in range(3)])

    def inputs(self, x):
        return [x] * 3

    def __call__(self, x):
        return self.each(self.inputs(x))


@nnx.jit
def layer_inputs(model, x):
    return model.inputs(x)


@nnx.jit
def each_layer(model, xs):
    return model.each(xs)


def rules_for(weights, acts, prefix="layers", integer_forward=False):
    """Rules layer by layer; the qat reference is the simulated (fake-quant, float) forward."""
    return [
        Rule(
            path=f"{prefix}/{i}",
            weights=weights,
            activations=a,
            activation_scale=scale,
            integer_forward=integer_forward,
        )
        for i, (a, scale) in enumerate(acts)
    ]


def shifted(rng, *shape):
    return jnp.asarray(rng.normal(size=shape) + 0.5, jnp.float32)


def parity_errors(model, rules, x, batches=()):
    """Max |serve - qat| per layer (asserting the bound), and the converted model."""
    q = qjax.nn.quantize_model(model, rules)
    if batches:
        qjax.nn.calibrate(q, batches)
    served = qjax.nn.convert(q)
    xs = layer_inputs(q, x)
    errors = []
    for i, (y_qat, y_serve) in enumerate(zip(each_layer(q, xs), each_layer(served, xs), strict=True)):
        y_qat, y_serve = np.asarray(y_qat, np.float64), np.asarray(y_serve, np.float64)
        assert y_qat.shape == y_serve.shape
        err = float(np.max(np.abs(y_serve - y_qat)))
        assert err <= 1e-5 * np.max(np.abs(y_qat)), (i, err)
        errors.append(err)
    return errors, served
