"""LSQ+ (``fake_quant(..., 'lsq_plus')``): forward and gradients against float64 formulas, finite
differences where the quantizer saturates, the min/max initialisation, and the ``qjax.nn``
integration (calibration, training, serving with an integer zero point).

References are float64 numpy from the formulas in ``qjax/ste.py``. The test inputs are built from
:math:`v = (x - \\beta)/s` chosen at least 0.05 away from every integer and half-integer, so float32
rounding of the quotient cannot flip a rounding decision or the in-range mask.
"""

import functools
import itertools
import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax import QuantSpec
from qjax.nn import Rule
from qjax.ste import lsq_plus_init, lsq_plus_qparams

SHAPE = (8, 32)
UINT4 = QuantSpec(dtype="uint4", symmetric=False)
INT4_CHANNEL = QuantSpec(dtype="int4", symmetric=False, granularity="per_channel", axis=-1)
INT3_GROUP = QuantSpec(dtype="int3", symmetric=False, granularity="per_group", axis=0, group_size=4)
UINT8_TOKEN = QuantSpec(dtype="uint8", symmetric=False, granularity="per_token")
INT4_W = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)

CASES = [  # spec, parameter shape, (qmin, qmax)
    pytest.param(UINT4, (), (0, 15), id="uint4-scalar"),
    pytest.param(INT4_CHANNEL, (1, 32), (-8, 7), id="int4-per_channel"),
    pytest.param(INT3_GROUP, (2, 32), (-4, 3), id="int3-per_group"),
    pytest.param(UINT8_TOKEN, (8, 1), (0, 255), id="uint8-per_token"),
]


def per_element(p, shape=SHAPE):
    p = np.asarray(p, np.float64)
    if p.ndim == 0:
        return np.broadcast_to(p, shape)
    reps = tuple(n // m for n, m in zip(shape, p.shape, strict=True))
    return np.kron(p, np.ones(reps))


def block_sum(values, param_shape):
    """Sum per-element values over the blocks that share one parameter entry."""
    if len(param_shape) == 0:
        return values.sum()
    grid = param_shape
    tiled = values.reshape(grid[0], SHAPE[0] // grid[0], grid[1], SHAPE[1] // grid[1])
    return tiled.sum(axis=(1, 3))


def away_from_ties(rng, lo, hi, shape=SHAPE):
    """Values k + u, k integer in [lo, hi], 0.05 <= |u| <= 0.45: no (half-)integer within 0.05."""
    k = rng.integers(lo, hi + 1, size=shape)
    u = rng.uniform(0.05, 0.45, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return k + u


def reference(v, s, beta, g, qmin, qmax, grad_scale, param_shape):
    """(x_hat, d/dx, d/ds, d/dbeta) in float64 at v = (x - beta)/s."""
    inside = (v > qmin) & (v < qmax)
    q = np.clip(np.round(v), qmin, qmax)
    x_hat = s * q + beta
    ds = np.where(inside, np.round(v) - v, np.where(v <= qmin, qmin, qmax))
    gx = np.where(inside, g, 0.0)
    gs = block_sum(g * ds, param_shape) * grad_scale
    gb = block_sum(np.where(inside, 0.0, g), param_shape) * grad_scale
    return x_hat, gx, gs, gb


@functools.partial(jax.jit, static_argnames=("spec", "integer_offset"))
def lsq_plus_vjp(x, g, scale, offset, spec, integer_offset):
    f = lambda x, s, b: qjax.fake_quant(x, spec, "lsq_plus", scale=s, offset=b, integer_offset=integer_offset)
    out, vjp = jax.vjp(f, x, scale, offset)
    return (out, *vjp(g))


def check_against_reference(spec, param_shape, qrange, integer_offset, rng):
    qmin, qmax = qrange
    s = rng.uniform(0.05, 0.3, size=param_shape).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, size=param_shape).astype(np.float32)
    v = away_from_ties(rng, qmin - 3, qmax + 3)
    s_el, b_el = per_element(s), per_element(b)
    if integer_offset:  # beta_Z = -s Z, Z = round(-beta / s): x = s (v - Z)
        z = per_element(np.round(-b.astype(np.float64) / s))
        beta = -s_el * z
    else:
        beta = b_el
    x = (s_el * v + beta).astype(np.float32)
    g = rng.normal(size=SHAPE).astype(np.float32)
    out, gx, gs, gb = lsq_plus_vjp(x, g, jnp.asarray(s), jnp.asarray(b), spec, integer_offset)
    n = math.prod(SHAPE) // max(1, math.prod(np.broadcast_shapes(param_shape, (1, 1))))
    grad_scale = 1.0 / math.sqrt(n * qmax)
    ref = reference(v, s_el, beta, g.astype(np.float64), qmin, qmax, grad_scale, param_shape)
    ref_out, ref_gx, ref_gs, ref_gb = ref
    assert gs.shape == gb.shape == param_shape and gs.dtype == gb.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5 * (np.abs(ref_out).max()))
    np.testing.assert_array_equal(gx, ref_gx)
    scale_of = lambda r: 1e-5 * (np.abs(g).sum() * (qmax - qmin) * grad_scale) + 1e-7
    np.testing.assert_allclose(gs, ref_gs, rtol=1e-5, atol=scale_of(ref_gs))
    np.testing.assert_allclose(gb, ref_gb, rtol=1e-5, atol=1e-6 * np.abs(g).sum() * grad_scale)
    inside = (v > qmin) & (v < qmax)
    assert inside.any() and not inside.all()  # both branches of every formula are exercised


# --- the estimator -----------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "param_shape", "qrange"), CASES)
def test_forward_and_gradients_match_the_formulas(spec, param_shape, qrange, rng):
    check_against_reference(spec, param_shape, qrange, integer_offset=False, rng=rng)


@pytest.mark.parametrize(("spec", "param_shape", "qrange"), CASES)
def test_integer_offset_gradients_are_the_formulas_at_the_rounded_offset(spec, param_shape, qrange, rng):
    check_against_reference(spec, param_shape, qrange, integer_offset=True, rng=rng)


@pytest.mark.parametrize(("spec", "param_shape", "qrange"), CASES)
def test_integer_offset_forward_is_exactly_the_serving_quantizer(spec, param_shape, qrange, rng):
    """x_hat = decode(encode(x, S=s, Z=round(-beta/s))) bit for bit, ties and clipping included."""
    x = (rng.normal(size=SHAPE) * 2).astype(np.float32)
    s = jnp.asarray(rng.uniform(0.02, 0.3, size=param_shape), jnp.float32)
    b = jnp.asarray(rng.uniform(-1.0, 1.0, size=param_shape), jnp.float32)
    g = jnp.ones(SHAPE, jnp.float32)
    out = lsq_plus_vjp(x, g, s, b, spec, True)[0]
    grid = np.broadcast_shapes(param_shape, (1, 1))
    qp = lsq_plus_qparams(s.reshape(grid), b.reshape(grid))
    np.testing.assert_array_equal(out, qjax.quantize_dequantize(x, spec, qparams=qp))
    z = np.round(-np.asarray(b, np.float64) / np.asarray(s, np.float64)).reshape(grid)
    np.testing.assert_array_equal(qp.zero_point, z)
    assert qp.zero_point.dtype == jnp.int32
    # the continuous offset's grid is shifted by |beta - beta_Z| <= s/2: results differ, by < one step
    cont = np.asarray(lsq_plus_vjp(x, g, s, b, spec, False)[0], np.float64)
    diff = np.abs(cont - np.asarray(out, np.float64))
    assert 0 < np.max(diff) <= 1.00001 * float(jnp.max(s))


def saturated_loss(spec, x, w, param_shape):
    return jax.jit(
        lambda s, b: jnp.sum(w * qjax.fake_quant(x, spec, "lsq_plus", scale=s, offset=b, grad_scale=1.0))
    )


@pytest.mark.parametrize(("spec", "param_shape", "qrange"), [CASES[0], CASES[1]])
def test_gradients_match_finite_differences_when_saturated(spec, param_shape, qrange, rng):
    """(x - beta)/s <= qmin or >= qmax everywhere: x_hat = s q_{min|max} + beta, smooth in s and beta."""
    qmin, qmax = qrange
    s = np.full(param_shape, 0.1, np.float32)
    b = np.full(param_shape, 0.3, np.float32)
    below = rng.random(SHAPE) < 0.5
    lo, hi = 0.3 + 0.1 * qmin, 0.3 + 0.1 * qmax
    x = np.where(below, lo - rng.uniform(1.0, 2.0, SHAPE), hi + rng.uniform(1.0, 2.0, SHAPE))
    x = jnp.asarray(x, jnp.float32)
    w = rng.normal(size=SHAPE)
    loss = saturated_loss(spec, x, jnp.asarray(w, jnp.float32), param_shape)
    gs, gb = jax.grad(loss, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(b))
    analytic_s = block_sum(w * np.where(below, qmin, qmax), param_shape)
    analytic_b = block_sum(w, param_shape)
    np.testing.assert_allclose(gs, analytic_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, analytic_b, rtol=1e-5, atol=1e-5)
    h = 1e-2
    entries = [()] if param_shape == () else [(0, 0), (0, 13), (0, 31)]
    for e in entries:
        step = np.zeros(param_shape, np.float32)
        step[e] = h
        fd_s = (loss(s + step, b) - loss(s - step, b)) / (2 * h)
        fd_b = (loss(s, b + step) - loss(s, b - step)) / (2 * h)
        np.testing.assert_allclose(fd_s, np.asarray(analytic_s)[e], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(fd_b, np.asarray(analytic_b)[e], rtol=2e-3, atol=2e-3)


def test_lsq_plus_init_is_the_min_max_of_each_block(rng):
    x = (rng.normal(size=SHAPE) * rng.uniform(0.1, 3.0, size=(1, 32)) + 0.5).astype(np.float32)
    scale, offset = jax.jit(lsq_plus_init, static_argnums=1)(x, INT4_CHANNEL)
    x64 = x.astype(np.float64)
    lo, hi = x64.min(axis=0, keepdims=True), x64.max(axis=0, keepdims=True)
    np.testing.assert_allclose(scale, (hi - lo) / 15, rtol=1e-6)
    np.testing.assert_allclose(offset, lo + 8 * (hi - lo) / 15, rtol=1e-5, atol=1e-6)
    # the grid's ends are the block's min and max: nothing saturates, every error <= s/2
    out = qjax.fake_quant(x, INT4_CHANNEL, "lsq_plus", scale=scale, offset=offset)
    assert np.all(np.abs(np.asarray(out, np.float64) - x64) <= np.asarray(scale) / 2 * (1 + 1e-5))


def test_adam_moves_scale_and_offset_towards_a_better_fit(rng):
    """A few optax steps on ||Q(x) - x||^2 from a poor start lower the error and move both parameters."""
    x = jnp.asarray(rng.normal(size=SHAPE) * 0.5 + 1.0, jnp.float32)  # mostly positive, skewed
    params = {"scale": jnp.float32(0.05), "offset": jnp.float32(-0.5)}

    def loss(p):
        return jnp.mean(jnp.square(qjax.fake_quant(x, UINT4, "lsq_plus", **p) - x))

    opt = optax.adam(2e-2)
    state = opt.init(params)

    @jax.jit
    def step(p, state):
        value, g = jax.value_and_grad(loss)(p)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(g, state)
        return optax.apply_updates(p, updates), state, value

    first = float(loss(params))
    for _ in range(30):
        params, state, _ = step(params, state)
    assert float(loss(params)) < 0.5 * first
    assert float(params["scale"]) > 0.06 and float(params["offset"]) > -0.45


def test_errors():
    x = jnp.ones(SHAPE)
    s = jnp.float32(0.1)
    with pytest.raises(ValueError, match=r"estimator='lsq_plus' needs scale=.* and offset="):
        qjax.fake_quant(x, UINT4, "lsq_plus", scale=s)
    with pytest.raises(ValueError, match=r"estimator='lsq_plus' learns an offset .* set symmetric=False"):
        qjax.fake_quant(x, QuantSpec(dtype="uint4"), "lsq_plus", scale=s, offset=s)
    with pytest.raises(
        ValueError, match=r"offset= is a learned parameter of estimator 'lsq_plus', not of 'lsq'"
    ):
        qjax.fake_quant(x, QuantSpec(dtype="int4"), "lsq", scale=s, offset=s)
    with pytest.raises(ValueError, match=r"integer_offset=True applies to estimator 'lsq_plus', not 'lsq'"):
        qjax.fake_quant(x, QuantSpec(dtype="int4"), "lsq", scale=s, integer_offset=True)
    with pytest.raises(ValueError, match=r"offset has shape \(8, 1\), which does not broadcast"):
        qjax.fake_quant(x, INT4_CHANNEL, "lsq_plus", scale=s, offset=jnp.ones((8, 1)))
    with pytest.raises(
        ValueError, match=r"estimator='lsq_plus' learns an integer grid; dtype='float8_e4m3fn'"
    ):
        qjax.fake_quant(x, QuantSpec(dtype="float8_e4m3fn"), "lsq_plus", scale=s, offset=s)
    with pytest.raises(
        ValueError, match=r"Rule 'l': weight_estimator='lsq_plus' learns an activation offset"
    ):
        Rule(path="l", weights=INT4_W, weight_estimator="lsq_plus")
    with pytest.raises(ValueError, match=r"activation_estimator='lsq_plus' .* symmetric=True"):
        Rule(path="l", activations=QuantSpec(dtype="uint4"), activation_estimator="lsq_plus")


# --- qjax.nn ------------------------------------------------------------------------------------


class SwishMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, widths=(32, 32, 32, 16)):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(widths)])

    def inputs(self, x):
        xs = [x]
        for layer in self.layers[:-1]:
            xs.append(jax.nn.swish(layer(xs[-1])))  # skewed: min ~ -0.28, max large
        return xs

    def each(self, xs):
        return [layer(x) for layer, x in zip(self.layers, xs, strict=True)]

    def __call__(self, x):
        return self.layers[-1](self.inputs(x)[-1])


def lsq_plus_rules(weights=INT4_W):
    return [
        Rule(
            path="layers/0",
            weights=weights,
            activations=QuantSpec(dtype="int8", symmetric=False),
            activation_estimator="lsq_plus",
        ),
        Rule(path="layers/.*", weights=weights, activations=UINT4, activation_estimator="lsq_plus"),
    ]


def normal(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


@nnx.jit
def layer_inputs(model, x):
    return model.inputs(x)


@nnx.jit
def each_layer(model, xs):
    return model.each(xs)


def _mse(model, batch):
    x, y = batch
    return jnp.mean(jnp.square(model(x) - y))


def trained(rng, rules, steps=3):
    model = SwishMLP(nnx.Rngs(0))
    q = qjax.nn.quantize_model(model, rules)
    batches = [normal(rng, 16, 32) for _ in range(2)]
    qjax.nn.calibrate(q, batches)
    init = jax.tree.map(np.array, qjax.nn.learned_quantizer_params(q))
    step = qjax.training.make_train_step(_mse)
    optimizer = qjax.training.make_optimizer(q, optax.adam(1e-2))
    batch = (normal(rng, 32, 32, scale=2.0), normal(rng, 32, 16))  # wider than calibration
    losses = [float(step(q, optimizer, batch)) for _ in range(steps)]
    return model, q, batches, init, losses


def test_calibration_initialises_scale_and_offset_from_min_max_and_training_moves_them(rng):
    model, q, batches, init, losses = trained(rng, lsq_plus_rules())
    inputs = [layer_inputs(model, b) for b in batches]
    for i, (qmin, qmax) in enumerate([(-128, 127), (0, 15), (0, 15)]):
        h = np.concatenate([np.asarray(xs[i], np.float64) for xs in inputs])
        s = (h.max() - h.min()) / (qmax - qmin)
        np.testing.assert_allclose(init[f"layers/{i}"]["act_scale"], s, rtol=1e-5)
        np.testing.assert_allclose(
            init[f"layers/{i}"]["act_offset"], h.min() - qmin * s, rtol=1e-5, atol=1e-6
        )
    assert init["layers/1"]["act_offset"] < 0  # swish: the offset reaches below zero
    after = qjax.nn.learned_quantizer_params(q)
    for path, params in init.items():
        for name in ("act_scale", "act_offset"):
            assert abs(float(after[path][name]) - float(params[name])) > 1e-4, (path, name)
    assert losses[-1] < losses[0]


def test_layer_gradient_is_the_estimator_gradient_with_the_features_grad_scale(rng):
    """Activation-only rule: d/ds and d/dbeta of the layer equal fake_quant's with
    grad_scale = 1/sqrt(N_F qmax), N_F = 32 features, and the integer offset."""
    model = SwishMLP(nnx.Rngs(0))
    q = qjax.nn.quantize_model(
        model, [Rule(path="layers/1", activations=UINT4, activation_estimator="lsq_plus")]
    )
    op = q.layers[1].dot_general
    op.act_scale[...] = jnp.float32(0.07)
    op.act_offset[...] = jnp.float32(-0.23)
    x, c = normal(rng, 8, 32, scale=2.0), normal(rng, 8, 32)
    h = jax.nn.swish(model.layers[0](x))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m.layers[1](h) * c)))(q)
    got = (
        grads["layers"][1]["dot_general"]["act_scale"][...],
        grads["layers"][1]["dot_general"]["act_offset"][...],
    )
    kernel, bias = model.layers[1].kernel[...], model.layers[1].bias[...]

    def ref(s, b):
        h_hat = qjax.fake_quant(
            h, UINT4, "lsq_plus", scale=s, offset=b, integer_offset=True, grad_scale=1 / math.sqrt(32 * 15)
        )
        return jnp.sum((h_hat @ kernel + bias[None]) * c)

    want = jax.jit(jax.grad(ref, argnums=(0, 1)))(jnp.float32(0.07), jnp.float32(-0.23))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(want[1]) != 0.0


def test_serve_equals_qat_with_the_learned_integer_zero_point(rng):
    _, q, _, _, _ = trained(rng, lsq_plus_rules())
    served = qjax.nn.convert(q)
    x = normal(rng, 8, 32, scale=2.0)
    xs = layer_inputs(q, x)
    for i, (y_qat, y_serve) in enumerate(zip(each_layer(q, xs), each_layer(served, xs), strict=True)):
        y_qat, y_serve = np.asarray(y_qat, np.float64), np.asarray(y_serve, np.float64)
        assert np.max(np.abs(y_serve - y_qat)) <= 1e-5 * np.max(np.abs(y_qat)), i
    for i in range(3):
        op = q.layers[i].dot_general
        qp = served.layers[i].dot_general.input_qparams()
        s, b = float(op.act_scale[...]), float(op.act_offset[...])
        assert float(qp.scale) == np.float32(s) and int(qp.zero_point) == round(-b / s)
        assert int(qp.zero_point) != 0


def test_activation_only_serving_is_bit_exact(rng):
    """Without a kernel quantizer both paths contract the same dequantized input with the same
    float kernel: the integer offset makes them identical."""
    model = SwishMLP(nnx.Rngs(0))
    rules = [Rule(path="layers/.*", activations=UINT4, activation_estimator="lsq_plus")]
    q = qjax.nn.quantize_model(model, rules)
    qjax.nn.calibrate(q, [normal(rng, 16, 32)])
    for i in range(3):  # offsets off the integer grid
        q.layers[i].dot_general.act_offset[...] += jnp.float32(0.37 * q.layers[i].dot_general.act_scale[...])
    served = qjax.nn.convert(q)
    xs = layer_inputs(q, normal(rng, 8, 32, scale=2.0))
    for y_qat, y_serve in zip(each_layer(q, xs), each_layer(served, xs), strict=True):
        np.testing.assert_array_equal(y_qat, y_serve)
