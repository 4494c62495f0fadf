"""AdaRound (``qjax/methods/adaround_core.py`` and ``adaround.py``).

References: the rectified sigmoid, the regulariser, the schedule and the loss in float64 numpy from
the paper's formulas; the grid against the quantizers (``qjax.quantize_dequantize`` with the same
parameters); the optimisation against nearest rounding of the same grid on the same (and on fresh)
samples; whole models against nearest-rounding PTQ with the same rules.

The optimisations run a few hundred to a thousand steps, so they use a learning rate of 1e-2 to
3e-2 instead of the paper's 1e-3 over 10,000 steps (Adam moves :math:`V` by about ``lr`` per step).
"""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec
from qjax.methods import AdaRoundConfig, LayerReport, adaround
from qjax.methods import adaround_core as core
from qjax.nn import Rule, quantize_model
from qjax.numerics.quantize import clip_bounds, decode

W4_CH_MSE = QuantSpec(dtype="int4", granularity="per_channel", axis=-1, calibration="mse")
W3_CH_MSE = QuantSpec(dtype="int3", granularity="per_channel", axis=-1, calibration="mse")
W4_TENSOR = QuantSpec(dtype="int4")
A8 = QuantSpec(dtype="int8")
FAST = AdaRoundConfig(iterations=800, lr=2e-2)

f64 = lambda a: np.asarray(a, np.float64)
run = nnx.jit(lambda m, x: m(x))
fq = jax.jit(qjax.quantize_dequantize, static_argnums=1)


def _h_ref(v):
    s = 1.0 / (1.0 + np.exp(-f64(v)))
    return np.clip(s * (core.ZETA - core.GAMMA) + core.GAMMA, 0.0, 1.0)


def _correlated(rng, n, d, scale=1.0):
    """Samples whose features are correlated (a random mixing of i.i.d. normals plus a common part)."""
    z = rng.normal(size=(n, d))
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + 0.8 * np.eye(d)
    return jnp.asarray(scale * (z @ mix + 0.5 * rng.normal(size=(n, 1))), jnp.float32)


def _images(rng, n, hw, c, scale=0.5):
    """(n, hw, hw, c) images, smooth in space (3x3 box sums of noise) and correlated across channels."""
    z = rng.normal(size=(n, hw + 2, hw + 2, c))
    smooth = sum(z[:, i : i + hw, j : j + hw] for i in range(3) for j in range(3)) / 3.0
    mix = rng.normal(size=(c, c)) / np.sqrt(c) + 0.8 * np.eye(c)
    return jnp.asarray(scale * (smooth @ mix), jnp.float32)


def _build(make, rng):
    """``make(rngs)``'s model with weights drawn by NumPy (N(0, 1/fan_in) kernels, N(0, 0.01) biases):
    no eager Flax initialisers, which compile once per shape."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))

    def init(s):
        scale = 1.0 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype)

    return nnx.merge(graphdef, jax.tree.map(init, state))


def _grid(w, spec):
    return core.rounding_grid(w, spec, qjax.calibrate(w, spec))


# --- the math ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [W4_CH_MSE, QuantSpec(dtype="int3", symmetric=False), QuantSpec(dtype="uint4")]
)
def test_init_puts_h_at_the_fractional_part(rng, spec):
    w = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)
    qp = qjax.calibrate(w, spec)
    grid = core.rounding_grid(w, spec, qp)
    # W / S as the quantizers compute it: times the float32 reciprocal of each column's scale.
    scale = np.broadcast_to(np.asarray(qp.scale, np.float32), (1, 6))
    y = np.asarray(w, np.float32) * (np.float32(1.0) / scale)
    np.testing.assert_array_equal(np.asarray(grid.base), np.floor(y))
    np.testing.assert_array_equal(np.asarray(grid.frac), y - np.floor(y))
    assert np.all((np.asarray(grid.frac) >= 0) & (np.asarray(grid.frac) < 1))
    v0 = core.init_rounding(grid)
    np.testing.assert_allclose(_h_ref(v0), f64(grid.frac), rtol=0, atol=2e-6)
    # Inside the range the soft weight starts at W itself.
    inside = np.asarray(w == jnp.clip(w, *clip_bounds(w.shape, spec, qp)))
    soft = f64(core.soft_weight(v0, grid))
    np.testing.assert_allclose(soft[inside], f64(w)[inside], rtol=0, atol=4e-6 * float(np.max(scale)))
    assert inside.mean() > 0.5


def test_rectified_sigmoid_and_its_inverse():
    v = jnp.linspace(-8.0, 8.0, 161, dtype=jnp.float32)
    h = core.rectified_sigmoid(v)
    np.testing.assert_allclose(f64(h), _h_ref(v), rtol=0, atol=1e-6)
    assert float(h[0]) == 0.0 and float(h[-1]) == 1.0  # rectified: exactly 0 and 1 at the ends
    h_in = jnp.linspace(0.0, 1.0, 101, dtype=jnp.float32)
    v_in = core.inverse_rectified_sigmoid(h_in)
    assert bool(jnp.all(jnp.isfinite(v_in)))
    np.testing.assert_allclose(f64(core.rectified_sigmoid(v_in)), f64(h_in), rtol=0, atol=2e-6)


def test_regularizer_matches_the_formula(rng):
    v = jnp.asarray(rng.normal(scale=3.0, size=(7, 5)), jnp.float32)
    for beta in (20.0, 7.5, 2.0):
        ref = np.sum(1.0 - np.abs(2.0 * _h_ref(v) - 1.0) ** beta)
        np.testing.assert_allclose(float(core.rounding_regularizer(v, beta)), ref, rtol=2e-5)
    hard = jnp.asarray([-10.0, 10.0, -30.0], jnp.float32)  # h = 0, 1, 0
    assert float(core.rounding_regularizer(hard, 2.0)) == 0.0


def test_hard_rounding_goes_up_where_h_reaches_one_half(rng):
    w = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    grid = _grid(w, W4_TENSOR)
    h = jnp.asarray(rng.uniform(0.0, 1.0, size=w.shape), jnp.float32)
    v = core.inverse_rectified_sigmoid(h)
    up = np.asarray(core.rectified_sigmoid(v)) >= 0.5
    expected = np.clip(np.asarray(grid.base) + up, -7, 7)
    np.testing.assert_array_equal(np.asarray(core.hard_values(v, grid)), expected)
    assert 0 < up.mean() < 1


W3_CH_FULL = QuantSpec(dtype="int3", granularity="per_channel", axis=-1, narrow_range=False)


def test_full_range_grid_reaches_its_lowest_level(rng):
    """narrow_range=False: -max|w| / S lies near -3.5, so rounding every weight down reaches the
    level -4 of int3's full range in each column whose extreme is negative (the narrow range stops
    at -3)."""
    w = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    grid = _grid(w, W3_CH_FULL)
    assert (float(grid.qmin), float(grid.qmax)) == (-4.0, 3.0)
    down = np.asarray(core.hard_values(jnp.full(w.shape, -10.0), grid))  # h(V) = 0 everywhere
    negative_extreme = np.abs(np.min(w, axis=0)) > np.max(w, axis=0)
    assert negative_extreme.any()
    np.testing.assert_array_equal(down.min(axis=0)[negative_extreme], -4)


@pytest.mark.parametrize("spec", [W4_CH_MSE, W3_CH_MSE, QuantSpec(dtype="int4", symmetric=False), W3_CH_FULL])
def test_hard_weight_is_on_the_grid_and_requantizes_to_itself(rng, spec):
    w = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    qp = qjax.calibrate(w, spec)
    grid = core.rounding_grid(w, spec, qp)
    v = jnp.asarray(rng.normal(scale=3.0, size=w.shape), jnp.float32)  # arbitrary decisions
    w_hat = core.hard_weight(v, grid)
    np.testing.assert_array_equal(np.asarray(w_hat), np.asarray(decode(core.hard_values(v, grid), spec, qp)))
    np.testing.assert_array_equal(
        np.asarray(qjax.quantize_dequantize(w_hat, spec, qparams=qp)), np.asarray(w_hat)
    )
    # Each value is floor(W/S) or floor(W/S) + 1 (then clipped): a rounding, never a bigger jump.
    q = np.asarray(core.hard_values(v, grid)) - (0 if qp.zero_point is None else np.asarray(qp.zero_point))
    step = q - np.asarray(grid.base)
    unclipped = (q > np.asarray(grid.qmin)) & (q < np.asarray(grid.qmax))
    assert set(np.unique(step[unclipped])) <= {0.0, 1.0}


def test_beta_schedule_and_warmup():
    cfg = AdaRoundConfig(iterations=100, warmup=0.2, beta_start=20.0, beta_end=2.0)
    steps = jnp.arange(100)
    beta, on = jax.jit(jax.vmap(lambda t: core.beta_schedule(t, cfg)))(steps)
    t = np.arange(100.0)
    np.testing.assert_array_equal(np.asarray(on), (t >= 20).astype(np.float32))
    ref = 2.0 + 18.0 * (1.0 - np.clip((t - 20.0) / 80.0, 0.0, 1.0))
    np.testing.assert_allclose(f64(beta), ref, rtol=1e-6)
    assert float(beta[20]) == 20.0 and abs(float(beta[99]) - (2.0 + 18.0 / 80.0)) < 1e-5
    beta0, on0 = core.beta_schedule(0, AdaRoundConfig(iterations=10, warmup=0.0))
    assert float(on0) == 1.0 and float(beta0) == 20.0


def test_loss_has_no_regulariser_during_the_warmup(rng):
    x = _correlated(rng, 64, 12)
    w = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    grid = _grid(w, W4_CH_MSE)
    v = core.init_rounding(grid) + jnp.asarray(rng.normal(scale=0.5, size=w.shape), jnp.float32)
    apply = lambda a, b: a @ b
    y = x @ w
    cfg = lambda lam: AdaRoundConfig(iterations=100, warmup=0.2, lambda_=lam)
    recon_ref = np.mean(np.sum((f64(x) @ f64(core.soft_weight(v, grid)) - f64(y)) ** 2, axis=-1))
    for step in (0, 19):
        loss, (recon, _) = core.adaround_loss(v, grid, apply, x, y, step, cfg(10.0))
        assert float(loss) == float(recon)
        np.testing.assert_allclose(float(recon), recon_ref, rtol=1e-4)
        g0, g1 = (
            jax.jit(
                jax.grad(lambda u, lam=lam, t=step: core.adaround_loss(u, grid, apply, x, y, t, cfg(lam))[0])
            )(v)
            for lam in (0.0, 10.0)
        )
        np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))
    loss, (recon, reg) = core.adaround_loss(v, grid, apply, x, y, 60, cfg(0.5))
    reg_ref = np.sum(1.0 - np.abs(2.0 * _h_ref(v) - 1.0) ** 11.0)  # beta_60 = 2 + 18 * (1 - 40/80)
    np.testing.assert_allclose(float(reg), reg_ref, rtol=1e-4)
    np.testing.assert_allclose(float(loss), recon_ref + 0.5 * reg_ref, rtol=1e-4)


def test_minibatches_are_shuffled_passes_without_repeats():
    order = core.minibatches(10, 3, 7, seed=(0, 1))
    assert order.shape == (7, 3) and order.dtype == np.int32
    for row in order:
        assert len(set(row.tolist())) == 3
    # Each pass over the 10 samples gives 3 minibatches of distinct samples (one is left out).
    for p in range(2):
        assert len(set(order[3 * p : 3 * p + 3].ravel().tolist())) == 9
    np.testing.assert_array_equal(order, core.minibatches(10, 3, 7, seed=(0, 1)))
    assert not np.array_equal(order, core.minibatches(10, 3, 7, seed=(0, 2)))
    with pytest.raises(ValueError, match=r"batch=11 must be in \[1, n=10\]"):
        core.minibatches(10, 11, 7, seed=0)


def _optimized(apply, w, x, spec, cfg):
    y = apply(x, w)
    qp = qjax.calibrate(w, spec)
    grid = core.rounding_grid(w, spec, qp)
    v = core.optimize_rounding(apply, grid, x, y, cfg)
    nearest = qjax.quantize_dequantize(w, spec, qparams=qp)
    return v, grid, core.hard_weight(v, grid), nearest


def test_linear_layer_rounding_converges_and_beats_nearest(rng):
    # How far lambda's pull drives h to 0 or 1 depends on the size of the reconstruction term, so on
    # the scale of the outputs (as in the paper's formulation); these are of order 0.1 to 1.
    x = _correlated(rng, 640, 16, scale=0.25)
    w = jnp.asarray(rng.normal(size=(16, 8)) / 4.0, jnp.float32)
    apply = lambda a, b: a @ b
    train, fresh = x[:512], x[512:]
    v, grid, w_hat, nearest = _optimized(apply, w, train, W3_CH_MSE, AdaRoundConfig(iterations=1000, lr=3e-2))
    h = np.asarray(core.rectified_sigmoid(v))
    h0 = np.asarray(core.rectified_sigmoid(core.init_rounding(grid)))
    assert np.mean((h0 > 0.01) & (h0 < 0.99)) > 0.9
    assert np.mean((h > 0.01) & (h < 0.99)) < 0.05
    ada, near = core.dataset_errors(apply, [w_hat, nearest], train, apply(train, w))
    assert ada < 0.8 * near
    ada_fresh, near_fresh = core.dataset_errors(apply, [w_hat, nearest], fresh, apply(fresh, w))
    assert ada_fresh < 0.85 * near_fresh  # it carries over to samples it did not see
    assert 0.02 < float(jnp.mean((w_hat != nearest).astype(jnp.float32))) < 0.5
    soft = core.dataset_errors(apply, [core.soft_weight(v, grid)], train, apply(train, w))[0]
    assert abs(soft - ada) < 0.1 * ada  # the soft weight has become the hard one


# --- whole models --------------------------------------------------------------------------------


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(12, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def _state(model):
    return jax.tree.map(np.asarray, nnx.state(model))


def _assert_same_state(model, before):
    jax.tree.map(np.testing.assert_array_equal, _state(model), before)


def test_mlp_outputs_closer_to_float_than_nearest_rounding(rng):
    model = _build(MLP, rng)
    x = _correlated(rng, 768, 12, scale=0.25)  # outputs of order 0.1 to 1 (see the linear layer test)
    train, test = x[:512], x[512:]
    rules = [Rule(path=".*", weights=W3_CH_MSE, activations=A8)]
    qmodel = quantize_model(model, rules)
    float_before, q_before = _state(model), _state(qmodel)
    report: list[LayerReport] = []
    ada = adaround(qmodel, model, [train[:256], train[256:]], config=FAST, report=report)
    _assert_same_state(model, float_before)  # neither input model changes
    _assert_same_state(qmodel, q_before)
    assert [r.path for r in report] == ["fc1", "fc2", "head"]
    for r in report:
        assert r.samples == 512 and r.error_adaround < 0.8 * r.error_nearest and r.soft_fraction < 0.05, r
    y = run(model, test)
    err_ada = float(jnp.mean(jnp.square(run(ada, test) - y)))
    err_nearest = float(jnp.mean(jnp.square(run(qmodel, test) - y)))
    assert err_ada < 0.6 * err_nearest, (err_ada, err_nearest)
    # The fake-quant forward and convert keep the AdaRound'ed kernels as they are: the qat output is
    # the float network with those kernels (and int8 inputs), and the stored kernels decode to them.
    kernels = {path: layer.kernel[...] for path, layer, _ in qjax.nn.quantized_ops(ada)}
    h = test
    for path in ("fc1", "fc2", "head"):
        assert not np.array_equal(np.asarray(kernels[path]), np.asarray(getattr(model, path).kernel[...]))
        h = fq(h, A8) @ kernels[path] + getattr(model, path).bias[...].reshape(1, -1)
        h = jax.nn.relu(h) if path != "head" else h
    np.testing.assert_allclose(np.asarray(run(ada, test)), np.asarray(h), rtol=1e-5, atol=1e-5)
    served = qjax.nn.convert(ada)
    for path, layer, _ in qjax.nn.quantized_ops(served):
        np.testing.assert_array_equal(
            np.asarray(qjax.dequantize(layer.kernel[...])), np.asarray(kernels[path])
        )
    np.testing.assert_allclose(np.asarray(run(served, test)), np.asarray(h), rtol=1e-5, atol=1e-5)


class ConvNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x):
        return self.conv2(jax.nn.relu(self.conv1(x)))


def test_conv_net_with_the_post_activation_objective(rng):
    model = _build(ConvNet, rng)
    x = _images(rng, 40, 8, 3)
    train, test = x[:32], x[32:]
    qmodel = quantize_model(model, [Rule(path=".*", weights=W3_CH_MSE)])
    report: list[LayerReport] = []
    relu_first = {"conv1": jax.nn.relu}  # conv1 feeds a relu; conv2 is the output
    ada = adaround(qmodel, model, [train], config=FAST, activation=relu_first, report=report)
    assert [r.path for r in report] == ["conv1", "conv2"]
    for r in report:  # the convolutions' reconstruction improves and the rounding becomes hard
        assert r.error_adaround < 0.6 * r.error_nearest and r.soft_fraction < 0.05, r
    y = run(model, test)
    assert float(jnp.mean(jnp.square(run(ada, test) - y))) < 0.5 * float(
        jnp.mean(jnp.square(run(qmodel, test) - y))
    )


class Ordered(nnx.Module):
    """Attribute (and graph) order: a_einsum, b_first; the forward calls b_first first."""

    def __init__(self, rngs: nnx.Rngs):
        self.b_first = nnx.Linear(8, 8, rngs=rngs)
        self.a_einsum = nnx.Einsum("bd,dk->bk", (8, 6), (6,), rngs=rngs)

    def __call__(self, x):
        return self.a_einsum(jax.nn.relu(self.b_first(x)))


def test_layers_run_in_execution_order_and_einsum_is_rounded(rng):
    model = _build(Ordered, rng)
    x = _correlated(rng, 256, 8)
    qmodel = quantize_model(model, [Rule(path=".*", weights=W3_CH_MSE)])
    assert [p for p, _ in qjax.nn.quantizable_layers(qmodel)] == ["a_einsum", "b_first"]
    report: list[LayerReport] = []
    cfg = AdaRoundConfig(iterations=400, lr=3e-2, samples=200)
    ada = adaround(qmodel, model, [x[:128], x[128:]], config=cfg, report=report)
    assert [r.path for r in report] == ["b_first", "a_einsum"]
    assert all(r.samples == 200 for r in report)
    assert all(r.error_adaround < r.error_nearest for r in report), report
    y = run(model, x)
    assert float(jnp.mean(jnp.square(run(ada, x) - y))) < float(jnp.mean(jnp.square(run(qmodel, x) - y)))


def test_paths_select_layers_and_leave_the_others(rng, caplog):
    model = _build(MLP, rng)
    x = _correlated(rng, 64, 12)
    qmodel = quantize_model(model, [Rule(path="head", weights=QuantSpec(dtype="float8_e4m3fn")),
                                    Rule(path=".*", weights=W4_CH_MSE)])  # fmt: skip
    with pytest.raises(ValueError, match=r"layer 'head': AdaRound rounds onto an integer grid.*float8"):
        adaround(qmodel, model, [x], config=AdaRoundConfig(iterations=5))
    report: list[LayerReport] = []
    with caplog.at_level("WARNING", logger="qjax"):
        ada = adaround(qmodel, model, [x], config=AdaRoundConfig(iterations=5), paths="fc1", report=report)
    assert [r.path for r in report] == ["fc1"]
    assert report[0].soft_fraction > 0.5  # 5 steps: far from converged, and the log says so
    assert "adaround fc1:" in caplog.text and "still soft" in caplog.text
    assert not np.array_equal(np.asarray(ada.fc1.kernel[...]), np.asarray(model.fc1.kernel[...]))
    for path in ("fc2", "head"):
        np.testing.assert_array_equal(
            np.asarray(getattr(ada, path).kernel[...]), np.asarray(getattr(model, path).kernel[...])
        )


def test_asymmetric_weights_keep_their_zero_point(rng):
    model = _build(MLP, rng)
    x = _correlated(rng, 128, 12)
    spec = QuantSpec(dtype="int4", symmetric=False, granularity="per_channel", axis=-1, calibration="mse")
    qmodel = quantize_model(model, [Rule(path=".*", weights=spec, activations=A8)])
    ada = adaround(qmodel, model, [x], config=AdaRoundConfig(iterations=200, lr=3e-2))
    served = qjax.nn.convert(ada)
    for (_, layer, _), (_, slayer, _) in zip(
        qjax.nn.quantized_ops(ada), qjax.nn.quantized_ops(served), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(qjax.dequantize(slayer.kernel[...])), np.asarray(layer.kernel[...])
        )
    y = run(model, x)
    assert float(jnp.mean(jnp.square(run(ada, x) - y))) < float(jnp.mean(jnp.square(run(qmodel, x) - y)))


# --- errors --------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    model = _build(MLP, np.random.default_rng(0))
    x = jnp.ones((4, 12), jnp.float32)
    qmodel = quantize_model(model, [Rule(path=".*", weights=W4_TENSOR)])
    with pytest.raises(ValueError, match="adaround got no batches"):
        adaround(qmodel, model, [])
    with pytest.raises(ValueError, match="has no quantized layers"):
        adaround(model, model, [x])
    with pytest.raises(ValueError, match=r"no layer of qmodel matches paths='conv\.\*'"):
        adaround(qmodel, model, [x], paths="conv.*")
    act_only = quantize_model(model, [Rule(path=".*", activations=A8)])
    with pytest.raises(ValueError, match="no layer of qmodel matches"):
        adaround(act_only, model, [x])
    other = _build(lambda rngs: nnx.Sequential(nnx.Linear(12, 4, rngs=rngs)), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"layer\(s\) \['fc1', 'fc2', 'head'\] were not called"):
        adaround(qmodel, other, [x])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iterations": 0}, r"iterations=0 must be an int >= 1"),
        ({"batch_size": 2.5}, r"batch_size=2.5 must be an int >= 1"),
        ({"lr": 0.0}, r"lr=0.0 must be > 0"),
        ({"lambda_": -1.0}, r"lambda_=-1.0 must be >= 0"),
        ({"beta_start": 2.0, "beta_end": 20.0}, r"need beta_start >= beta_end > 0"),
        ({"warmup": 1.0}, r"warmup=1.0 must be in \[0, 1\)"),
        ({"samples": 0}, r"samples=0 must be an int >= 1 or None"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaRoundConfig(**kwargs)


def test_config_from_dict():
    cfg = AdaRoundConfig.from_dict({"iterations": 50, "lambda": 0.1, "warmup": 0.3})
    assert cfg == AdaRoundConfig(iterations=50, lambda_=0.1, warmup=0.3)
    with pytest.raises(
        ValueError, match=r"unknown AdaRoundConfig field 'iteration'; did you mean 'iterations'"
    ):
        AdaRoundConfig.from_dict({"iteration": 5})
    with pytest.raises(ValueError, match=r"dtype='float8_e4m3fn' is not an integer format"):
        core.rounding_grid(jnp.ones((4, 4)), QuantSpec(dtype="float8_e4m3fn"), qjax.QParams(jnp.ones(())))
