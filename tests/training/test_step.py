"""QAT train / eval steps (qjax.training.step) and the resumable data position (qjax.training.data)."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import qjax
from qjax import training
from qjax.nn import QuantStats, Rule, StaticQParams

LR = 0.05


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


RULES = [
    Rule(
        path=".*",
        weights=qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1),
        activations=qjax.QuantSpec(dtype="int8"),
        weight_estimator="lsq",
        activation_estimator="pact",
    )
]


def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def loss_and_logits(model, batch):
    x, y = batch
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def accuracy(model, batch):
    x, y = batch
    return jnp.mean((jnp.argmax(model(x), axis=-1) == y).astype(jnp.float32))


SGD_STEP = training.make_train_step(loss_fn)
AUX_STEP = training.make_train_step(loss_and_logits, has_aux=True)
EVAL_STEP = training.make_eval_step(accuracy)
FORWARD = nnx.jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int32)


@pytest.fixture(scope="module")
def batch(digits):
    x, y = digits
    return jnp.asarray(x[:64]), jnp.asarray(y[:64])


def qat_model(batch, seed=0):
    model = qjax.nn.quantize_model(MLP(nnx.Rngs(seed)), RULES, mode="qat")
    return qjax.nn.calibrate(model, [batch[0]])  # QuantStats filled, LSQ / PACT initialised


def test_sgd_step_is_theta_minus_lr_grad_and_leaves_stats_alone(batch):
    model = qat_model(batch)
    params = nnx.state(model, nnx.Param)
    other = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.Param)))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def pure_loss(p):  # the loss as a plain function of the parameters, differentiated by jax.grad
        return loss_fn(nnx.merge(graphdef, p, rest), batch)

    want_loss, grads = jax.jit(jax.value_and_grad(pure_loss))(params)
    want = jax.tree.map(lambda p, g: np.float64(p) - LR * np.float64(g), params, grads)
    optimizer = training.make_optimizer(model, optax.sgd(LR))
    loss = SGD_STEP(model, optimizer, batch)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    jax.tree.map(
        lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7),
        nnx.state(model, nnx.Param),
        want,
    )
    # Quantizer parameters got a gradient and moved; statistics and static qparams did not.
    learned = qjax.nn.learned_quantizer_params(model)
    assert set(learned["l1"]) == {"weight_scale", "act_clip"}
    assert float(jnp.max(jnp.abs(grads["l1"]["dot_general"]["weight_scale"][...]))) > 0
    assert float(jnp.abs(grads["l2"]["dot_general"]["act_clip"][...])) > 0
    assert len(jax.tree.leaves(nnx.state(model, QuantStats))) == 2 * 8
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(nnx.Param)), other)
    assert int(model.l1.dot_general.stats.get_value()["count"]) == batch[0].size


def test_adam_qat_lowers_loss_and_trains_quantizer_parameters(batch):
    model = qat_model(batch)
    start = jax.tree.map(np.asarray, qjax.nn.learned_quantizer_params(model))
    optimizer = training.make_optimizer(model, optax.adam(1e-2))
    losses = [float(AUX_STEP(model, optimizer, batch)[0]) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    end = qjax.nn.learned_quantizer_params(model)
    for path in ("l1", "l2"):
        assert not np.allclose(end[path]["weight_scale"], start[path]["weight_scale"])
        assert float(end[path]["act_clip"]) != float(start[path]["act_clip"])
    assert int(optimizer.step[...]) == 15


def test_aux_output_is_the_forward_before_the_update(batch):
    model = qat_model(batch)
    want = np.asarray(FORWARD(model, batch[0]))
    optimizer = training.make_optimizer(model, optax.adam(1e-2))
    _, logits = AUX_STEP(model, optimizer, batch)
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(FORWARD(model, batch[0]), want)


def test_grad_norm_is_the_global_norm_of_the_applied_gradients(batch):
    """``return_grad_norm``: the norm of the gradients the step applies, against float64 numpy on
    gradients taken apart by ``jax.grad``; the update is the same as without it."""
    model, twin = qat_model(batch), qat_model(batch)
    params = nnx.state(model, nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)))(params)
    want = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in jax.tree.leaves(grads)))
    step = training.make_train_step(loss_fn, return_grad_norm=True)
    loss, norm = step(model, training.make_optimizer(model, optax.sgd(LR)), batch)
    assert float(norm) == pytest.approx(want, rel=1e-5) and want > 0
    twin_loss = SGD_STEP(twin, training.make_optimizer(twin, optax.sgd(LR)), batch)
    assert float(loss) == pytest.approx(float(twin_loss))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), nnx.state(twin, nnx.Param))


def test_static_activation_scales_are_not_trained(batch):
    spec_w, spec_a = RULES[0].weights, RULES[0].activations
    rules = [Rule(path=".*", weights=spec_w, activations=spec_a, activation_scale="static")]
    model = qjax.nn.calibrate(qjax.nn.quantize_model(MLP(nnx.Rngs(0)), rules), [batch[0]])
    static = jax.tree.map(np.asarray, nnx.state(model, StaticQParams))
    assert len(jax.tree.leaves(static)) >= 2
    optimizer = training.make_optimizer(model, optax.sgd(LR))
    kernel = np.asarray(model.l1.kernel[...])
    training.make_train_step(loss_fn)(model, optimizer, batch)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, StaticQParams), static)
    assert not np.array_equal(model.l1.kernel[...], kernel)


def test_eval_step_matches_numpy_accuracy_and_changes_nothing(digits, batch):
    model = qat_model(batch)
    before = jax.tree.map(np.asarray, nnx.state(model))
    got = float(EVAL_STEP(model, batch))
    logits = np.asarray(FORWARD(model, batch[0]), np.float64)
    assert got == pytest.approx(np.mean(np.argmax(logits, axis=-1) == np.asarray(batch[1])))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


# -- data position -------------------------------------------------------------------------------


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    pairs = take(training.batch_indices(10, 3, seed=7), 6)  # 3 batches per epoch, 1 example dropped
    first = np.concatenate([idx for _, idx in pairs[:3]])
    assert len(set(first.tolist())) == 9
    np.testing.assert_array_equal(first, np.random.default_rng([7, 0]).permutation(10)[:9])
    assert [p.to_dict() for p, _ in pairs[2:4]] == [
        {"step": 3, "epoch": 1, "index": 0},
        {"step": 4, "epoch": 1, "index": 1},
    ]
    assert not np.array_equal(pairs[3][1], pairs[0][1])  # epoch 1 has its own order


def test_resuming_from_a_saved_position_gives_the_same_stream():
    full = take(training.batch_indices(50, 8, seed=3), 14)
    pos = training.DataPosition.from_dict(full[8][0].to_dict())
    resumed = take(training.batch_indices(50, 8, seed=3, start=pos), 5)
    for (p, a), (q, b) in zip(full[9:], resumed, strict=True):
        assert p == q
        np.testing.assert_array_equal(a, b)


def test_bad_positions_and_batch_sizes_are_refused():
    with pytest.raises(ValueError, match=r"batch_size=0 must be in \[1, num_examples=5\]"):
        next(training.batch_indices(5, 0, seed=0))
    with pytest.raises(ValueError, match="index=4 is past the 2 batches"):
        next(training.batch_indices(5, 2, seed=0, start=training.DataPosition(index=4)))
    with pytest.raises(ValueError, match=r"DataPosition epoch=-1 must be a non-negative integer"):
        training.DataPosition(epoch=-1)
