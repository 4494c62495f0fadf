"""Knowledge distillation losses on logits: a student matches a teacher's distribution.

For logits :math:`z^t, z^s \\in \\mathbb{R}^V` of the teacher and the student at one position and a
temperature :math:`T > 0`, with :math:`p = \\operatorname{softmax}(z^t / T)` and
:math:`q = \\operatorname{softmax}(z^s / T)`,

.. math::

    \\mathrm{KL}_T(p \\,\\|\\, q) = \\sum_v p_v (\\log p_v - \\log q_v) \\ \\ge 0,

zero exactly when the two distributions agree. :func:`distillation_loss` mixes its mean over the
positions with the student's cross-entropy on the true targets :math:`y` (Hinton et al. 2015):

.. math::

    \\mathcal{L} = \\lambda\\, T^2\\, \\overline{\\mathrm{KL}_T(p \\,\\|\\, q)}
                 + (1 - \\lambda)\\, \\overline{\\log \\textstyle\\sum_v e^{z^s_v} - z^s_y},

:math:`\\lambda` = ``kd_weight``. The factor :math:`T^2` keeps the gradient of the first term on the
scale of :math:`T = 1` (its gradient in :math:`z^s` is :math:`T (q - p)`). The teacher is a constant:
no gradient reaches :math:`z^t`. The forward-KL direction (teacher first) is the one LLM-QAT
(Liu et al. 2023) minimises: the student is penalised wherever the teacher puts mass.

Everything is computed in float32 through ``log_softmax``: finite logits give finite losses
(:math:`p_v = 0` after underflow contributes :math:`0 \\cdot \\text{finite} = 0`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(temperature: float, kd_weight: float = 1.0) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0, e.g. 1.0 (the distributions as they are)")
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(
            f"kd_weight={kd_weight} must be in [0, 1]: 1 is pure distillation, 0 pure cross-entropy"
        )


def token_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """:math:`\\mathrm{KL}_T(p \\,\\|\\, q)` per position: logits ``(..., V)`` -> ``(...)`` float32.

    The teacher's logits are passed through ``stop_gradient``."""
    _check(temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {teacher_logits.shape} and student_logits {student_logits.shape} differ; "
            "give both the (..., V) logits of the same positions"
        )
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    log_p = jax.nn.log_softmax(t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """:math:`\\log\\sum_v e^{z_v} - z_y` per position: logits ``(..., V)``, integer targets
    ``(...)`` -> ``(...)`` float32."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets {targets.shape} must be the logits' {logits.shape} without the last (class) axis"
        )
    z = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(z, axis=-1) - picked


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
) -> jax.Array:
    """:math:`\\mathcal{L}` of the module docstring, a float32 scalar: the mean over every position
    of ``(..., V)`` logits; ``targets`` ``(...)`` are needed when ``kd_weight < 1``."""
    _check(temperature, kd_weight)
    loss = jnp.zeros((), jnp.float32)
    if kd_weight > 0:
        kl = token_kl(teacher_logits, student_logits, temperature)
        loss = loss + kd_weight * temperature**2 * jnp.mean(kl)
    if kd_weight < 1:
        if targets is None:
            raise ValueError(f"kd_weight={kd_weight} mixes in the cross-entropy: pass the targets")
        loss = loss + (1.0 - kd_weight) * jnp.mean(token_cross_entropy(student_logits, targets))
    return loss


__all__ = ["distillation_loss", "token_cross_entropy", "token_kl"]
