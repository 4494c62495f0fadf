"""Tasks: datasets and the small models the experiments train, looked up by config name.

``get_task(TaskConfig)`` returns a :class:`~experiments.tasks.base.Task`; datasets are loaded once per
process per ``(name, data_dir)``. The task modules (``digits``, ``fashion_mnist``, ``tiny_lm``) are
imported on first use. Tasks and models are looked up in :mod:`experiments.tasks.registry`, where
plug-ins add theirs (:func:`register_task`, :func:`register_model`).

Classification shares one loss and one set of metrics, whether a label belongs to an example (the
image tasks) or to a position (``tiny_lm``'s next byte): logits :math:`z \\in \\mathbb{R}^{N
\\times C}` over the :math:`N` labels :math:`y` of a batch (any leading shape, flattened here),

.. math::

    \\ell_i = \\log \\textstyle\\sum_c e^{z_{ic}} - z_{i y_i}, \\qquad
    \\mathrm{loss} = \\tfrac{1}{N} \\textstyle\\sum_i \\ell_i, \\qquad
    \\mathrm{accuracy} = \\frac{\\sum \\mathrm{correct}}{\\sum \\mathrm{count}}

``metrics`` returns per-batch sums (``correct``, ``loss_sum``, ``count``); ``finish`` divides the
totals over all batches. Metrics refuse a model in training mode (a BatchNorm on batch statistics
would both give other numbers and overwrite its running averages): call ``model.eval()`` first.
The image tasks share one MLP shape too (:class:`ImageMLP`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.tasks.base import Split, Task, evaluate
from experiments.tasks.registry import (
    TASK_MODULES,
    batchnorm_pairs,
    load_task,
    register_model,
    register_task,
    takes_data_args,
    task_models,
    task_names,
    unregister_model,
    unregister_task,
)


def require_inference_mode(model: nnx.Module) -> None:
    """Raise if a module of ``model`` is in training behaviour (BatchNorm on batch statistics,
    active Dropout). Runs in Python, so inside ``jit`` it costs one check per trace."""
    for parts, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        if (
            getattr(node, "use_running_average", None) is False
            or getattr(node, "deterministic", None) is False
        ):
            where = "/".join(str(p) for p in parts) or "(root)"
            raise ValueError(
                f"module {where!r} ({type(node).__name__}) is in training mode; call model.eval() before "
                "evaluating (and model.train() before training)"
            )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example :math:`\\ell_i` (any leading shape), computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def classification_loss(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean cross-entropy of ``model(x)`` against ``y`` over all labels."""
    x, y = batch
    return jnp.mean(cross_entropy(model(x), y))


def classification_metrics(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """Per-batch sums over all labels: ``correct`` (top-1), ``loss_sum`` (cross-entropy), ``count``."""
    require_inference_mode(model)
    x, y = batch
    logits = model(x)
    return {
        "correct": jnp.sum(jnp.argmax(logits, axis=-1) == y).astype(jnp.float32),
        "loss_sum": jnp.sum(cross_entropy(logits, y)),
        "count": jnp.asarray(y.size, jnp.float32),
    }


def classification_finish(totals: dict[str, float]) -> dict[str, float]:
    """``accuracy`` and mean ``loss`` from the summed metrics."""
    n = totals["count"]
    return {"accuracy": totals["correct"] / n, "loss": totals["loss_sum"] / n}


def classification_task(
    name: str,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    models: dict[str, Any],
    checksum: str,
    description: str,
) -> Task:
    """A :class:`Task` of ``(x_train, y_train, x_test, y_test)`` with the classification loss,
    metrics and finish of this module."""
    xtr, ytr, xte, yte = arrays
    return Task(
        name=name,
        train=Split(xtr, ytr),
        test=Split(xte, yte),
        models=dict(models),
        loss=classification_loss,
        metrics=classification_metrics,
        finish=classification_finish,
        checksum=checksum,
        description=description,
    )


class ImageMLP(nnx.Module):
    """``in_features -> hidden -> hidden -> classes`` with ReLU, on the flattened image.

    Shapes: ``x`` (B, ...) with ``in_features`` elements per example -> logits (B, classes).
    """

    def __init__(self, in_features: int, hidden: int, classes: int = 10, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.head(jax.nn.relu(self.fc2(x)))


def _did_you_mean(value: str, choices: Any) -> str:
    hint = difflib.get_close_matches(value, list(choices), n=1)
    return f"did you mean {hint[0]!r}? " if hint else ""


def get_task(config: Any) -> Task:
    """The :class:`Task` of a :class:`experiments.sweep.schema.TaskConfig` (``name``, ``model``,
    ``data_dir``, ``train_limit``: the first N training examples only).

    Raises ``ValueError`` with a suggestion for an unknown task or model name, before loading data.
    """
    models = task_models(config.name)  # an unknown task: SpecError (a ValueError) with the names
    if config.model not in models:
        raise ValueError(
            f"task.model={config.model!r} is not a model of task {config.name!r}; "
            f"{_did_you_mean(config.model, models)}use one of {sorted(models)}"
        )
    if config.train_limit < 0:
        raise ValueError(f"task.train_limit={config.train_limit} must be >= 0 (0 = all)")
    data_args = getattr(config, "data_args", {}) or {}
    if data_args and not takes_data_args(config.name):
        raise ValueError(f"task.data_args={dict(data_args)!r}: only task 'llm' takes data options")
    task = load_task(config.name, config.data_dir, tuple(sorted(data_args.items())))
    task = dataclasses.replace(task, models={**models, **task.models})  # the task's own constructors win
    if 0 < config.train_limit < len(task.train):
        n = config.train_limit
        task = dataclasses.replace(
            task,
            train=Split(task.train.x[:n], task.train.y[:n]),
            description=f"{task.description}; first {n} training examples",
        )
    return task


__all__ = [
    "TASK_MODULES",
    "ImageMLP",
    "Split",
    "Task",
    "batchnorm_pairs",
    "classification_finish",
    "classification_loss",
    "classification_metrics",
    "classification_task",
    "cross_entropy",
    "evaluate",
    "get_task",
    "load_task",
    "register_model",
    "register_task",
    "require_inference_mode",
    "task_models",
    "task_names",
    "unregister_model",
    "unregister_task",
]
