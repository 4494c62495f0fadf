"""QAT against PTQ on sklearn digits: at W4A4, quantization-aware fine-tuning of the same float
model beats post-training quantization, for an MLP and a CNN, on every seed.

W4A4 here is int4 symmetric per-tensor weights and int4 symmetric per-tensor activations with
static (calibrated min/max) ranges, the plain PTQ recipe; QAT fine-tunes that same quantized model
with the straight-through estimator.
"""

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from experiments.tasks import digits

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def data():
    return digits.load_digits()


def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


TRAIN_STEP = qjax.training.make_train_step(loss_fn)


def train(model, data, steps: int, lr: float, seed: int):
    xtr, ytr, _, _ = data
    opt = qjax.training.make_optimizer(model, optax.adam(optax.cosine_decay_schedule(lr, steps)))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(ytr), 64)
        TRAIN_STEP(model, opt, (jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx])))
    return model


def w4a4(model, data):
    rule = qjax.nn.Rule(
        path=".*",
        weights=qjax.QuantSpec(dtype="int4"),
        activations=qjax.QuantSpec(dtype="int4"),
        activation_scale="static",
    )
    q = qjax.nn.quantize_model(model, [rule])
    return qjax.nn.calibrate(q, [jnp.asarray(data[0][:256])])


@pytest.mark.parametrize(
    "make",
    [lambda s: digits.MLP(32, rngs=nnx.Rngs(s)), lambda s: digits.CNN(rngs=nnx.Rngs(s))],
    ids=["mlp", "cnn"],
)
def test_qat_beats_ptq_at_w4a4(make, data):
    _, _, xte, yte = data
    floats, ptqs, qats = [], [], []
    for seed in SEEDS:
        model = train(make(seed), data, 600, 3e-3, seed)
        ptq = w4a4(model, data)
        floats.append(digits.accuracy(model, xte, yte))
        ptqs.append(digits.accuracy(ptq, xte, yte))
        qat = train(w4a4(model, data), data, 300, 1e-3, seed + 10)
        qats.append(digits.accuracy(qat, xte, yte))
        assert digits.accuracy(model, xte, yte) == floats[-1]  # the float model was left untouched
    print(f"float {np.mean(floats):.4f} PTQ W4A4 {np.mean(ptqs):.4f} QAT W4A4 {np.mean(qats):.4f}")
    assert all(q > p for q, p in zip(qats, ptqs, strict=True)), (ptqs, qats)
    assert np.mean(qats) >= np.mean(ptqs) + 0.0075, (ptqs, qats)
    assert np.mean(floats) > 0.94
