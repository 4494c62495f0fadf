"""The training phase of a cell after quantization: QAT (on the task's loss or by distillation
from the float model) and ``finetune`` (the float model trained as QAT would be), resumable from
the cell's checkpoints, each reporting to the cell's observers as its phase."""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import flax.nnx as nnx

from experiments.sweep import tracking
from experiments.sweep.placement import Placement
from experiments.sweep.schema import ExperimentConfig, Method
from experiments.sweep.train_loop import (
    distill_loss,
    make_schedule,
    make_tx,
    total_steps,
    train,
    train_section_tx,
    trainable,
)
from experiments.tasks.base import Task, evaluate

logger = logging.getLogger("qjax.experiments")


def monitor(
    cfg: ExperimentConfig, phase: str, schedule: Any, observer: tracking.TrainObserver | None
) -> tracking.Monitor | None:
    """How a training phase reports to ``observer`` (``None``: it does not)."""
    if observer is None:
        return None
    return tracking.Monitor(
        phase=phase, observer=observer, learning_rate=schedule, log_every=cfg.tracking.log_every
    )


def quantization_aware(
    cfg: ExperimentConfig,
    task: Task,
    qmodel: nnx.Module,
    base: nnx.Module,
    cell_dir: pathlib.Path,
    observer: tracking.TrainObserver | None,
    placement: Placement,
    metrics: dict[str, float] | None,
) -> nnx.Module:
    """``qmodel`` fine-tuned in place if ``method.name`` is ``qat`` (``base`` is the teacher of
    ``method.distill``), else as it is; with ``eval.before_qat`` its metrics before the
    fine-tuning go to ``metrics`` as ``ptq_<name>``."""
    if cfg.method.name != Method.QAT:
        return qmodel
    if cfg.eval.before_qat:
        qmodel.eval()
        before = evaluate(task, qmodel, cfg.eval.batch_size, cfg.eval.limit, placement.take)
        logger.info("before QAT: %s", before)
        if metrics is not None:
            metrics.update({f"ptq_{k}": v for k, v in before.items()})
    return fine_tune(
        cfg, task, qmodel, cell_dir, observer, placement, teacher=base if cfg.method.distill else None
    )


def fine_tune(
    cfg: ExperimentConfig,
    task: Task,
    model: nnx.Module,
    cell_dir: pathlib.Path,
    observer: tracking.TrainObserver | None,
    placement: Placement | None = None,
    teacher: nnx.Module | None = None,
) -> nnx.Module:
    """Train ``model`` in place for ``method.epochs`` (or ``method.steps``; with
    ``method.from_scratch``, as the ``train`` section trains the float model), resumably, on the
    task's loss or, with a ``teacher``, by distillation (:func:`~experiments.sweep.train_loop.
    distill_loss`), the parameters matching ``method.freeze`` fixed; its metrics go to
    ``observer`` as the phase ``method.name`` (``qat`` or ``finetune``)."""
    m = cfg.method
    # from scratch: the run of the float model (train), so that float and quantized training match
    run = cfg.train if m.from_scratch else m
    steps = total_steps(run.epochs, run.steps, len(task.train), cfg.train.batch_size)
    where = "train" if m.from_scratch else "method"
    if steps < 1:
        raise ValueError(
            f"{where}.epochs={run.epochs} over {len(task.train)} training examples in batches of "
            f"train.batch_size={cfg.train.batch_size} is 0 steps; set {where}.steps, or a "
            f"train.batch_size <= {len(task.train)}"
        )
    if m.from_scratch:
        tx, schedule = train_section_tx(cfg.train, steps)
    else:
        tx = make_tx(m.optimizer, m.learning_rate, m.schedule, steps)
        schedule = make_schedule(m.learning_rate, m.schedule, steps)
    loss = None
    if teacher is not None:
        teacher.eval()
        loss = distill_loss(task, temperature=m.distill_temperature, kd_weight=m.distill_weight)
    train(
        task,
        model,
        tx,
        steps=steps,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed if m.from_scratch else cfg.seed + 1,  # from scratch: the float model's batches
        checkpoint_dir=cell_dir / "ckpt",
        checkpoint_every=cfg.train.checkpoint_every,
        keep=cfg.train.keep_checkpoints,
        placement=placement,
        monitor=monitor(cfg, str(m.name), schedule, observer),
        loss=loss,
        teacher=teacher,
        wrt=trainable(model, m.freeze),
    )
    return model
