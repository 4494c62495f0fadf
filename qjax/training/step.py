"""Jitted train and eval steps for any NNX model, quantized or not.

One step with optimizer :math:`(\\mathrm{init}, \\mathrm{update})` (optax) on the variables selected
by the optimizer's ``wrt`` filter (``nnx.Param``: weights, biases, LSQ scales, PACT clips):

.. math::  \\ell, g = \\mathcal{L}(\\theta; b),\\ \\nabla_\\theta \\mathcal{L}(\\theta; b), \\qquad
           u, s \\leftarrow \\mathrm{update}(g, s, \\theta), \\qquad \\theta \\leftarrow \\theta + u.

Variables outside the filter (``qjax.nn.QuantStats``, ``StaticQParams``, batch statistics, RNG
counters) get no gradient and are never touched by optax; mutations the forward pass makes to them
(an RNG stream advancing, a statistic updating) are kept, as everywhere in NNX. The amax histories
of delayed gradient scaling (``qjax.nn.GradientAmaxHistory``) are differentiated too, and
overwritten by their gradient: the backward pass returns each updated history as its cotangent
(:mod:`qjax.nn.quantized_backward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

from qjax.nn import GradientAmaxHistory


def make_optimizer(model: nnx.Module, tx: Any, *, wrt: Any = nnx.Param) -> nnx.Optimizer:
    """``nnx.Optimizer`` over the ``wrt`` variables of ``model`` (``nnx.Param`` by default: the
    trainable weights and the learned quantizer parameters, not the calibration statistics)."""
    return nnx.Optimizer(model, tx, wrt=wrt)


def _pin(node: Any, shardings: Any) -> None:
    nnx.update(node, jax.lax.with_sharding_constraint(nnx.state(node), shardings))


def make_train_step(
    loss_fn: Callable[[Any, Any], Any],
    *,
    has_aux: bool = False,
    shardings: tuple[Any, Any] | None = None,
    return_grad_norm: bool = False,
) -> Callable[[Any, nnx.Optimizer, Any], Any]:
    """A jitted ``train_step(model, optimizer, batch)`` that updates both in place.

    Args:
      loss_fn: ``loss_fn(model, batch) -> loss`` (a scalar), or ``-> (loss, aux)`` with ``has_aux``.
      has_aux: whether ``loss_fn`` returns auxiliary outputs (metrics, logits).
      shardings: ``(model_shardings, optimizer_shardings)`` from
        :func:`~qjax.training.state_shardings`; the updated state is constrained to them, so a
        sharded model keeps its layout step after step (GSPMD would otherwise pick the layout of
        the outputs). ``None`` on one device.
      return_grad_norm: also return the global norm of the gradients,
        :math:`\\lVert g \\rVert_2 = (\\sum_i \\sum_j g_{ij}^2)^{1/2}` over every leaf :math:`i`
        (``optax.tree.norm``), computed inside the step from the gradients it applies (no second
        forward or backward pass); a device scalar, so reading it is the caller's sync to choose.

    Returns ``loss`` (or ``(loss, aux)``); with ``return_grad_norm``, ``(that, grad_norm)``.
    Gradients are taken with respect to the optimizer's ``wrt`` filter, so they match what the
    optimizer updates (and the gradient amax histories, which are overwritten, not optimized).
    """

    def train_step(model: Any, optimizer: nnx.Optimizer, batch: Any) -> Any:
        wrt = nnx.Any(optimizer.wrt, GradientAmaxHistory)
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)
        out, all_grads = grad_fn(model, batch)
        histories, grads = nnx.split_state(all_grads, GradientAmaxHistory, ...)
        nnx.update(model, histories)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            optimizer.update(model, grads)
        if shardings is not None:
            _pin(model, shardings[0])
            _pin(optimizer, shardings[1])
        return (out, optax.tree.norm(grads)) if return_grad_norm else out

    return nnx.jit(train_step)


def make_eval_step(metric_fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A jitted ``eval_step(model, batch) -> metric_fn(model, batch)`` (no gradients, no update).

    Put stochastic layers in inference behaviour first (e.g. ``model.eval()`` for ``nnx.Dropout``).
    """

    def eval_step(model: Any, batch: Any) -> Any:
        return metric_fn(model, batch)

    return nnx.jit(eval_step)


class TrainingDiverged(ValueError):
    """A run's loss became non-finite or blew up (see :class:`LossWatch`)."""


@jax.jit
def _watch(state: jax.Array, step: jax.Array, loss: jax.Array, max_ratio: jax.Array) -> jax.Array:
    """``state = [first loss, first bad step, its loss]`` (``nan``: none yet) after one more step."""
    loss = jnp.asarray(loss, jnp.float32)
    first = jnp.where(jnp.isnan(state[0]), loss, state[0])
    bad = ~jnp.isfinite(loss) | ((max_ratio > 0) & (jnp.abs(loss) > max_ratio * jnp.abs(first)))
    new = jnp.isnan(state[1]) & bad
    return jnp.stack(
        [first, jnp.where(new, step.astype(jnp.float32), state[1]), jnp.where(new, loss, state[2])]
    )


class LossWatch:
    r"""The health of a training run, watched on the device (no host round trip per step).

    Step :math:`t` with loss :math:`\ell_t` is *bad* when :math:`\ell_t` is not finite, or when
    :math:`|\ell_t| > r\,|\ell_{t_0}|` (:math:`t_0`: the first step watched, :math:`r`:
    ``max_ratio``; ``0`` turns that test off). :meth:`check` raises :class:`TrainingDiverged`
    naming the first bad step and its loss; call it before saving a checkpoint, so that a
    diverged model is never saved. Non-finite gradients show as a non-finite loss one step later
    (they make the parameters non-finite).
    """

    def __init__(self, max_ratio: float = 1e4):
        if not max_ratio >= 0:
            raise ValueError(f"max_ratio={max_ratio} must be >= 0 (0: only non-finite losses are bad)")
        self.max_ratio = float(max_ratio)
        self.state = jnp.full((3,), jnp.nan, jnp.float32)

    def update(self, step: int, loss: Any) -> None:
        self.state = _watch(self.state, jnp.int32(step), loss, jnp.float32(self.max_ratio))

    def check(self) -> None:
        first, step, loss = (float(v) for v in jax.device_get(self.state))
        if step != step:  # nan: no bad step
            return
        why = (
            "is not finite"
            if not math.isfinite(loss)
            else f"is over {self.max_ratio:g} x the first loss {first:.4g}"
        )
        raise TrainingDiverged(
            f"training diverged at step {int(step)}: loss {loss:.4g} {why}; lower the learning rate "
            "(or check the data and the quantizer ranges)"
        )


__all__ = ["LossWatch", "TrainingDiverged", "make_eval_step", "make_optimizer", "make_train_step"]
