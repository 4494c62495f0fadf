"""A resumable training loop over a task's training split.

The loop checkpoints model, optimizer and data position every ``checkpoint_every`` steps with
:class:`qjax.training.TrainingCheckpointer`; started again on the same directory it restores the
latest checkpoint and continues, so a killed run ends with the same parameters as an
uninterrupted one. The data order is :func:`qjax.training.batch_indices` (a function of seed,
epoch and index), and the learning-rate schedule depends only on the step, which the restored
optimizer state carries.
"""

from __future__ import annotations

import itertools
import logging
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import numpy as np
import optax

import qjax
from experiments.sweep import tracking
from experiments.sweep.placement import Placement
from experiments.sweep.schema import Optimizer, Schedule, TrainConfig
from experiments.tasks.base import Task
from qjax import training

logger = logging.getLogger("qjax.experiments")


def total_steps(epochs: int, steps: int, num_examples: int, batch_size: int) -> int:
    """``steps`` if positive, else ``epochs`` full passes (the incomplete last batch dropped)."""
    return steps if steps > 0 else epochs * (num_examples // batch_size)


def make_schedule(
    learning_rate: float, schedule: Schedule, steps: int, *, warmup_steps: int = 0
) -> optax.Schedule:
    """The learning rate of the update at optimizer count ``t`` (0 for the first step) over
    ``steps`` steps: what :func:`make_tx` trains with and the tracker logs."""
    if schedule == Schedule.CONSTANT:
        return optax.constant_schedule(learning_rate)
    if schedule == Schedule.COSINE:
        return optax.cosine_decay_schedule(learning_rate, max(steps, 1))
    if schedule == Schedule.WARMUP_COSINE:
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(steps, warmup_steps + 1)
        )
    raise ValueError(f"schedule={schedule!r} is not one of constant, cosine, warmup_cosine")


def train_section_tx(t: TrainConfig, steps: int) -> tuple[Any, Any]:
    """The optax transformation and learning-rate schedule of a ``train`` section over ``steps``
    (warmup and weight decay included): the float model's run, and a run from scratch."""
    tx = make_tx(
        t.optimizer,
        t.learning_rate,
        t.schedule,
        steps,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
    )
    return tx, make_schedule(t.learning_rate, t.schedule, steps, warmup_steps=t.warmup_steps)


def make_tx(
    optimizer: Optimizer,
    learning_rate: float,
    schedule: Schedule,
    steps: int,
    *,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """The optax optimizer with its learning-rate schedule over ``steps`` steps
    (:func:`make_schedule`; a constant rate as a number, so the optimizer state has no count)."""
    lr: Any = make_schedule(learning_rate, schedule, steps, warmup_steps=warmup_steps)
    if schedule == Schedule.CONSTANT:
        lr = learning_rate
    if optimizer == Optimizer.ADAM:
        return optax.adam(lr)
    if optimizer == Optimizer.ADAMW:
        return optax.adamw(lr, weight_decay=weight_decay)
    if optimizer == Optimizer.SGD:
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"optimizer={optimizer!r} is not one of adam, adamw, sgd")


def distill_loss(
    task: Task, *, temperature: float, kd_weight: float
) -> Callable[[nnx.Module, Any], jax.Array]:
    """``loss(student, (batch, teacher))``: :func:`qjax.training.distillation_loss` of the
    student's and the teacher's :attr:`~experiments.tasks.base.Task.predictions` on ``batch``
    (the teacher runs in the same step and gets no gradient)."""
    predictions = task.predictions
    if predictions is None:
        raise ValueError(
            f"task {task.name!r} gives no predictions to distil (Task.predictions); set method.distill: false"
        )

    def loss(student: nnx.Module, inputs: tuple[Any, nnx.Module]) -> jax.Array:
        batch, teacher = inputs
        logits, targets = predictions(student, batch)
        teacher_logits, _ = predictions(teacher, batch)
        return training.distillation_loss(
            logits, teacher_logits, targets, temperature=temperature, kd_weight=kd_weight
        )

    return loss


def trainable(model: nnx.Module, freeze: Sequence[str]) -> Any:
    """The ``nnx.Param`` filter of the variables a run trains: those whose path (``/``-joined,
    e.g. ``embed/embedding``) matches none of the ``freeze`` regexes (``re.search``); each regex
    must match some parameter of ``model``."""
    if not freeze:
        return nnx.Param
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    for pattern in freeze:
        if not any(re.search(pattern, p) for p in paths):
            raise ValueError(
                f"method.freeze: {pattern!r} matches no parameter; the parameters are "
                f"{', '.join(paths[:6])}, ... (e.g. 'embed' for the embedding)"
            )
    compiled = [re.compile(p) for p in freeze]

    def frozen(path: tuple[Any, ...], _: Any) -> bool:
        joined = "/".join(map(str, path))
        return any(r.search(joined) for r in compiled)

    return nnx.All(nnx.Param, nnx.Not(frozen))


def train(
    task: Task,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    checkpoint_dir: pathlib.Path,
    checkpoint_every: int,
    keep: int,
    placement: Placement | None = None,
    max_loss_ratio: float = 1e4,
    monitor: tracking.Monitor | None = None,
    loss: Callable[[nnx.Module, Any], jax.Array] | None = None,
    teacher: nnx.Module | None = None,
    wrt: Any = nnx.Param,
) -> nnx.Module:
    """Train ``model`` in place for ``steps`` steps, resuming from ``checkpoint_dir`` if it holds a
    checkpoint; the final step is always checkpointed. With a ``placement`` on a mesh, the model
    and optimizer state are placed on it (and restored onto it) and each batch is split over it.
    A non-finite loss, or one over ``max_loss_ratio`` times the first (:class:`qjax.training.
    LossWatch`), raises :class:`qjax.training.TrainingDiverged` before the next checkpoint.

    ``loss(model, batch)`` (default ``task.loss``) is minimised over the ``wrt`` variables (an nnx
    filter: :func:`trainable`); with a ``teacher`` it is called as ``loss(model, (batch, teacher))``
    (:func:`distill_loss`) and the teacher is never changed.

    A ``monitor``'s observer is told where the run starts, every step, and the metrics of every
    logged step (:mod:`experiments.sweep.tracking`); only logged steps read values from the device."""
    place = placement or Placement()
    place.model(model)
    optimizer = place.optimizer(training.make_optimizer(model, tx, wrt=wrt), model)
    logs = monitor is not None and monitor.log_every > 0
    with training.TrainingCheckpointer(checkpoint_dir, save_every=checkpoint_every, keep=keep) as ckpt:
        restored = ckpt.restore(model, optimizer)
        shardings = None if place.mesh is None else training.state_shardings(model, optimizer)
        objective = task.loss if loss is None else loss
        train_step = training.make_train_step(objective, shardings=shardings, return_grad_norm=logs)
        start = training.DataPosition()
        if restored is not None and restored.data is not None:
            start = training.DataPosition.from_dict(restored.data)
        if start.step:
            logger.info("resuming at step %d of %d from %s", start.step, steps, checkpoint_dir)
        if monitor is not None:
            monitor.observer.begin(monitor.phase, start.step, steps)
        statistics = nnx.jit(tracking.quantizer_statistics) if logs and qjax.nn.quantized_ops(model) else None
        model.train()
        watch = training.LossWatch(max_loss_ratio)
        stream = training.batch_indices(len(task.train), batch_size, seed=seed, start=start)
        for position, idx in itertools.islice(stream, max(steps - start.step, 0)):
            batch = place.take(task.train, idx)
            out = train_step(model, optimizer, batch if teacher is None else (batch, teacher))
            loss, grad_norm = out if logs else (out, None)
            watch.update(position.step, loss)
            if monitor is not None:
                monitor.observer.advance(monitor.phase, position.step)
                if monitor.logs(position.step, steps):
                    device = {"loss": loss, "grad_norm": grad_norm}
                    device.update(statistics(model) if statistics is not None else {})
                    lr = float(monitor.learning_rate(position.step - 1))
                    monitor.observer.log(monitor.phase, position.step, step_metrics(device, lr))
            last = position.step == steps
            if last or position.step % checkpoint_every == 0:
                watch.check()  # a diverged model is never checkpointed
            ckpt.save(position.step, model, optimizer, data=position, force=last)
    model.eval()
    return model


def on_this_process(x: Any) -> Any:
    """``x``, or with several processes this process's copy of it (a step's scalars are
    replicated: every process holds the whole value)."""
    return x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x


def step_metrics(device: dict[str, Any], lr: float) -> dict[str, float]:
    """The row of a logged step: the ``device`` scalars (loss, gradient norm, quantizer statistics)
    read in one transfer, and ``lr``, the learning rate of the step's update."""
    host = jax.device_get({k: on_this_process(v) for k, v in device.items()})
    return {**{k: float(np.asarray(v)) for k, v in host.items()}, "lr": lr}
