"""Distillation losses (qjax.training.distill) against float64 numpy: the per-token KL, its mix with
the cross-entropy, their gradients, finiteness on extreme logits, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import training

SHAPE = (2, 5, 11)  # (batch, positions, classes)


def log_softmax64(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def kl_reference(teacher, student, t):
    log_p, log_q = log_softmax64(np.asarray(teacher, np.float64) / t), log_softmax64(np.asarray(student) / t)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def ce_reference(logits, targets):
    return -np.take_along_axis(log_softmax64(logits), np.asarray(targets)[..., None], axis=-1)[..., 0]


def logits(seed, scale=3.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(SHAPE), jnp.float32)


TARGETS = jnp.asarray(np.random.default_rng(9).integers(0, SHAPE[-1], SHAPE[:-1]), jnp.int32)


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0])
def test_token_kl_matches_float64(t):
    teacher, student = logits(0), logits(1)
    kl = jax.jit(training.token_kl, static_argnums=2)(teacher, student, t)
    assert kl.shape == SHAPE[:-1] and kl.dtype == jnp.float32
    np.testing.assert_allclose(kl, kl_reference(teacher, student, t), rtol=1e-5, atol=1e-6)
    assert float(jnp.min(kl)) > 0
    np.testing.assert_allclose(training.token_kl(teacher, teacher, t), 0.0, atol=1e-6)


@pytest.mark.parametrize("t, w", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.0), (2.0, 0.25)])
def test_distillation_loss_and_its_gradient_match_float64(t, w):
    """L = w T^2 mean KL + (1 - w) mean CE; dL/dz_s = (w T (q - p) + (1 - w)(softmax(z_s) - onehot)) / n,
    and no gradient reaches the teacher."""
    teacher, student = logits(2), logits(3)

    def loss(s, te):
        return training.distillation_loss(s, te, TARGETS, temperature=t, kd_weight=w)

    value, (g_s, g_t) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(student, teacher)
    ref = (
        w * t**2 * kl_reference(teacher, student, t).mean() + (1 - w) * ce_reference(student, TARGETS).mean()
    )
    np.testing.assert_allclose(float(value), ref, rtol=1e-5)
    n = np.prod(SHAPE[:-1])
    p, q = np.exp(log_softmax64(np.asarray(teacher) / t)), np.exp(log_softmax64(np.asarray(student) / t))
    onehot = np.eye(SHAPE[-1])[np.asarray(TARGETS)]
    grad_ref = (w * t * (q - p) + (1 - w) * (np.exp(log_softmax64(student)) - onehot)) / n
    np.testing.assert_allclose(g_s, grad_ref, rtol=1e-4, atol=1e-7)
    assert not np.any(np.asarray(g_t))


def test_extreme_logits_give_finite_losses_and_gradients():
    """Logits of +-1e4 (probabilities that underflow to 0) keep the loss and its gradient finite."""
    teacher = logits(4, scale=1e4)
    student = logits(5, scale=1e4)
    value, grad = jax.value_and_grad(training.distillation_loss)(student, teacher, TARGETS, kd_weight=0.5)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(
        float(training.distillation_loss(student, teacher)),
        kl_reference(teacher, student, 1.0).mean(),
        rtol=1e-5,
    )


def test_errors_name_the_fix():
    z = logits(6)
    with pytest.raises(ValueError, match=r"temperature=0 must be > 0, e\.g\. 1\.0"):
        training.token_kl(z, z, 0)
    with pytest.raises(ValueError, match=r"kd_weight=1\.5 must be in \[0, 1\]"):
        training.distillation_loss(z, z, TARGETS, kd_weight=1.5)
    with pytest.raises(ValueError, match=r"kd_weight=0\.5 mixes in the cross-entropy: pass the targets"):
        training.distillation_loss(z, z, kd_weight=0.5)
    with pytest.raises(
        ValueError, match=r"teacher_logits \(2, 5, 11\) and student_logits \(2, 5, 10\) differ"
    ):
        training.token_kl(z, z[..., :10])
    with pytest.raises(ValueError, match=r"targets \(2, 4\) must be the logits' \(2, 5, 11\) without"):
        training.token_cross_entropy(z, TARGETS[:, :4])
