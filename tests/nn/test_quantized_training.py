"""Quantized backward passes in models: forward values unchanged, gradients those of
qjax.nn.quantized_backward's math, keys threaded through steps, delayed scaling's histories, the
FP8 recipes' operands in the lowered program, and the rule's errors."""

import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax.nn import GradientSpec, Rule, training_recipe
from qjax.nn.quantized_backward import dot_backward
from qjax.numerics import SpecError


class MLP(nnx.Module):
    def __init__(self, rngs, width=32, out=16):
        self.a = nnx.Linear(16, width, rngs=rngs)
        self.b = nnx.Linear(width, out, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


class Block(nnx.Module):
    """A Linear, an Einsum and a Conv: every contraction kind the backward quantizes."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.proj = nnx.Einsum("bhwc,cd->bhwd", (4, 8), rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.proj(jax.nn.relu(self.conv(x)))))


def grads_of(model, x, weights):
    """Gradients of sum(model(x) * weights) with respect to the parameters (model unchanged)."""
    g, params, rest = nnx.split(model, nnx.Param, ...)
    f = lambda p: jnp.sum(nnx.merge(g, p, rest, copy=True)(x) * weights)
    return jax.grad(f)(params)


def leaves(tree):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


INT8 = dict(
    weights=qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1),
    activations=qjax.QuantSpec(dtype="int8", granularity="per_token"),
)
FP8 = dict(weights=qjax.QuantSpec(dtype="float8_e4m3fn"), activations=qjax.QuantSpec(dtype="float8_e4m3fn"))


@pytest.mark.parametrize(
    "fields", [INT8, FP8, {**INT8, "weight_estimator": "lsq"}], ids=["int8", "fp8", "lsq"]
)
def test_forward_values_are_those_without_gradient_quantization(fields):
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
    plain = qjax.nn.quantize_model(Block(nnx.Rngs(0)), [Rule(path=".*", **fields)])
    quant = qjax.nn.quantize_model(
        Block(nnx.Rngs(0)), [Rule(path=".*", gradients=GradientSpec(dtype="int8"), **fields)]
    )
    np.testing.assert_array_equal(plain(x), quant(x))
    w = jax.random.normal(jax.random.key(1), plain(x).shape)
    kernels = lambda m: [v for p, v in nnx.to_flat_state(grads_of(m, x, w)) if p[-1] == "kernel"]
    differ = [not np.array_equal(a[...], b[...]) for a, b in zip(kernels(plain), kernels(quant), strict=True)]
    assert len(differ) == 3 and all(differ), differ


@pytest.mark.parametrize("integer_forward", [True, False])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_block"])
def test_linear_gradients_are_the_quantized_backward_math(integer_forward, granularity):
    """A single Linear: dL/dW = Q_r(Q(x))^T Q_g(g) (qjax.nn.quantized_backward.dot_backward, itself
    checked against float64), the same on the integer and the simulated forward paths."""
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    spec = GradientSpec(dtype="int8", granularity=granularity, block_size=4)
    rule = Rule(path=".*", gradients=spec, integer_forward=integer_forward, **INT8)
    model = qjax.nn.quantize_model(model, [rule])
    x = jax.random.normal(jax.random.key(2), (6, 16))
    weights = jax.random.normal(jax.random.key(3), (6, 8))
    grads = grads_of(model, x, weights)
    qx = qjax.quantize_dequantize(x, INT8["activations"])
    kernel = model.kernel[...]
    qw = qjax.quantize_dequantize(kernel, INT8["weights"])
    _, dw = dot_backward(weights, qx, qw, (((1,), (0,)), ((), ())), spec, None)
    np.testing.assert_allclose(grads["kernel"][...], dw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["bias"][...], weights.sum(0), rtol=1e-6)


def test_stochastic_gradient_rounding_draws_from_the_layer_stream():
    """Each step draws new noise (the layer's key stream advances); a model built with the same
    seed repeats the same draws."""
    rule = training_recipe("int8_stochastic")
    x = jax.random.normal(jax.random.key(4), (8, 16))
    w = jax.random.normal(jax.random.key(5), (8, 16))
    step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * w)))  # nnx: the key stream's state moves
    first = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [rule])
    a1, a2 = leaves(step(first)), leaves(step(first))
    second = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [rule])
    b1 = leaves(step(second))
    assert any(not np.array_equal(u, v) for u, v in zip(a1, a2, strict=True))
    for u, v in zip(a1, b1, strict=True):
        np.testing.assert_array_equal(u, v)


def test_delayed_scaling_histories_move_with_each_train_step():
    model = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [training_recipe("fp8_delayed", amax_history=4)])
    opt = qjax.training.make_optimizer(model, optax.sgd(1e-3))
    x = jax.random.normal(jax.random.key(6), (8, 16))
    y = jax.random.normal(jax.random.key(7), (8, 16))
    loss = lambda m, b: jnp.sum((m(b[0]) - b[1]) ** 2)
    step = qjax.training.make_train_step(loss)
    # the gradient of the last layer's output: 2 (m(x) - y), with the first step's forward
    g = 2 * (model(x) - y)
    op = model.b.dot_general
    # model(x) above pushed one input/kernel maximum; the step pushes the second
    step(model, opt, (x, y))
    hist = op.gradient_history[...]
    np.testing.assert_allclose(hist[0], jnp.max(jnp.abs(g)), rtol=1e-5)
    np.testing.assert_array_equal(hist[1:], 0.0)
    inputs = op.amax_history.get_value()["input"]
    assert inputs[0] > 0 and inputs[1] > 0 and inputs[2] == 0
    step(model, opt, (x, y))
    hist2 = op.gradient_history[...]
    np.testing.assert_allclose(hist2[1], hist[0])
    assert hist2[0] > 0 and hist2[2] == 0
    # the optimizer never saw the histories
    assert not any("history" in str(p) for p in jax.tree_util.tree_leaves_with_path(opt.opt_state))


DOT = re.compile(r"stablehlo\.dot_general .*: \((tensor<[0-9x]+x(\w+)>), (tensor<[0-9x]+x(\w+)>)\)")


def dot_operand_types(model, x):
    g, params, rest = nnx.split(model, nnx.Param, ...)
    f = lambda p: jnp.sum(nnx.merge(g, p, rest, copy=True)(x) ** 2)
    text = jax.jit(jax.grad(f)).trace(params).lower().as_text()
    return [(m.group(2), m.group(4)) for m in DOT.finditer(text)]


@pytest.mark.parametrize(
    "recipe,expected",
    [
        ("fp8_current", {("f8E4M3FN", "f8E4M3FN"), ("f8E5M2", "f8E4M3FN"), ("f8E4M3FN", "f8E5M2")}),
        ("fp8_delayed", {("f8E4M3FN", "f8E4M3FN"), ("f8E5M2", "f8E4M3FN"), ("f8E4M3FN", "f8E5M2")}),
        ("fp8_blockwise", {("f8E4M3FN", "f8E4M3FN")}),
        ("int8", {("i8", "i8")}),
    ],
)
def test_recipes_contract_low_precision_operands_in_the_lowered_program(recipe, expected):
    """Forward, dL/dx and dL/dW of every layer: the operand types of the lowered dot_generals
    (the scale contractions of f32 grids aside)."""
    model = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [training_recipe(recipe, block_size=16)])
    types = [t for t in dot_operand_types(model, jnp.ones((16, 16))) if t != ("f32", "f32")]
    assert set(types) == expected, types
    # 2 layers: 2 forward, 2 dL/dW, 1 dL/dx (the input's gradient is not needed)
    assert len([t for t in types if t[0] in ("f8E4M3FN", "f8E5M2", "i8")]) >= 5, types


def test_fp8_recipe_lowers_for_gpu():
    model = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [training_recipe("fp8_current")])
    g, params, rest = nnx.split(model, nnx.Param, ...)
    f = lambda p, x: jnp.sum(nnx.merge(g, p, rest, copy=True)(x) ** 2)
    lowered = jax.jit(jax.grad(f)).trace(params, jnp.ones((16, 16))).lower(lowering_platforms=("cuda",))
    assert "f8E5M2" in lowered.as_text()


def test_conv_model_trains_with_quantized_gradients():
    rule = Rule(path=".*", gradients=GradientSpec(dtype="int8", granularity="per_channel"), **INT8)
    model = qjax.nn.quantize_model(Block(nnx.Rngs(0)), [rule])
    opt = qjax.training.make_optimizer(model, optax.adam(1e-2))
    x = jax.random.normal(jax.random.key(8), (4, 5, 5, 2))
    y = jax.random.normal(jax.random.key(9), (4, 5, 5, 4))
    step = qjax.training.make_train_step(lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2))
    losses = [float(step(model, opt, (x, y))) for _ in range(30)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_zero_gradients_stay_finite():
    model = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [training_recipe("fp8_delayed")])
    x = jnp.zeros((4, 16))
    grads = grads_of(model, x, jnp.zeros((4, 16)))
    assert all(np.all(np.isfinite(v)) for v in leaves(grads))


def test_rule_errors_name_the_field():
    with pytest.raises(SpecError, match="per-tensor") as e:
        Rule(path=".*", amax_history=8, **INT8)
    assert e.value.field == "amax_history"
    with pytest.raises(SpecError, match="integer >= 0"):
        Rule(path=".*", amax_history=-1, **FP8)
    with pytest.raises(SpecError, match="learns them"):
        Rule(path=".*", amax_history=8, weight_estimator="lsq", **FP8)
    with pytest.raises(SpecError, match="neither weights nor activations") as e:
        Rule(path=".*", gradients={"dtype": "int8"})
    assert e.value.field == "gradients"
    with pytest.raises(SpecError, match="attention scales are current") as e:
        Rule(path=".*", kind="attention", activations={"dtype": "int8"}, amax_history=4)
    assert e.value.field == "amax_history"
    with pytest.raises(SpecError, match="did you mean 'fp8_delayed'"):
        training_recipe("fp8_delay")
    with pytest.raises(SpecError, match="dtyp"):
        Rule(path=".*", gradients={"dtyp": "int8"}, **INT8)


def test_conv_transpose_with_gradients_is_refused_at_quantize_model():
    class Up(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(2, 3, (2, 2), rngs=rngs)

        def __call__(self, x):
            return self.up(x)

    rule = Rule(path=".*", gradients=GradientSpec(dtype="int8"), **FP8)
    with pytest.raises(ValueError, match="ConvTranspose layer keeps a float backward pass"):
        qjax.nn.quantize_model(Up(nnx.Rngs(0)), [rule])


def test_original_residuals_quantize_the_float_operands_in_the_backward_pass():
    """``ste_residuals='original'`` on the integer forward: the backward contractions quantize the
    float x and W (not Q(x), Q(W))."""
    spec = GradientSpec(dtype="int8", granularity="per_channel")
    rule = Rule(path=".*", gradients=spec, ste_residuals="original", **INT8)
    model = qjax.nn.quantize_model(nnx.Linear(16, 8, rngs=nnx.Rngs(1)), [rule])
    x = jax.random.normal(jax.random.key(10), (6, 16))
    weights = jax.random.normal(jax.random.key(11), (6, 8))
    grads = grads_of(model, x, weights)
    _, dw = dot_backward(weights, x, model.kernel[...], (((1,), (0,)), ((), ())), spec, None)
    np.testing.assert_allclose(grads["kernel"][...], dw, rtol=1e-5, atol=1e-6)


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=rngs)

    def __call__(self, x):
        return self.attn(x)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_attention_contractions_take_quantized_backward_passes(rounding):
    """QK^T and PV: the forward as without gradients, the gradients of the projections through
    the quantized backward contractions (int8 dots in the lowered program, close to float)."""
    acts = {"dtype": "int8", "granularity": "per_token"}
    plain_rule = Rule(path=".*", kind="attention", activations=acts)
    grads = GradientSpec(dtype="int8", granularity="per_channel", rounding=rounding)
    rule = Rule(path=".*", kind="attention", activations=acts, gradients=grads)
    plain = qjax.nn.quantize_model(Attention(nnx.Rngs(0)), [plain_rule])
    quant = qjax.nn.quantize_model(Attention(nnx.Rngs(0)), [rule])
    x = jax.random.normal(jax.random.key(12), (2, 6, 8))
    np.testing.assert_array_equal(plain(x), quant(x))
    w = jax.random.normal(jax.random.key(13), (2, 6, 8))
    gp = nnx.to_flat_state(grads_of(plain, x, w))
    gq = dict(nnx.to_flat_state(grads_of(quant, x, w)))
    query = [(p, v) for p, v in gp if p[-2:] == ("query", "kernel")]
    assert query
    for path, ref in query:
        got = gq[path][...]
        assert not np.array_equal(got, ref[...])
        assert qjax.nn.sqnr_db(ref[...], got) > 15.0
    types = dot_operand_types(quant, x)
    assert types.count(("i8", "i8")) >= 4, types  # 2 backward contractions of each of QK^T and PV
