"""What the runner needs from a task: data as in-memory arrays, a model factory, a loss, metrics.

Batches are gathered from whole-dataset numpy arrays by index arrays (one fancy-indexing call per
batch, no Python loop per example), with the order of :func:`qjax.training.batch_indices`, so a
saved :class:`qjax.training.DataPosition` resumes the exact same stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """Inputs and targets of one split, whole, as numpy arrays."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of the examples ``idx``, on the host."""
        return self.x[idx], self.y[idx]

    def take(self, idx: np.ndarray) -> tuple[jax.Array, jax.Array]:
        return jnp.asarray(self.x[idx]), jnp.asarray(self.y[idx])

    def index_batches(self, batch_size: int, limit: int = 0) -> Iterator[np.ndarray]:
        """The indices of in-order batches (the last may be smaller), over the first ``limit``
        examples if set."""
        n = len(self) if limit <= 0 else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield np.arange(start, min(start + batch_size, n))

    def batches(self, batch_size: int, limit: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
        """In-order batches (the last may be smaller), over the first ``limit`` examples if set."""
        for idx in self.index_batches(batch_size, limit):
            yield self.take(idx)


@dataclasses.dataclass(frozen=True)
class Task:
    """A dataset with its models and metrics.

    Attributes:
      name: the task's config name.
      train, test: the splits (``test`` is the validation split for language modelling).
      models: model name -> constructor ``f(rngs=..., **model_args)``.
      loss: ``loss(model, batch) -> scalar`` mean loss, differentiable.
      metrics: ``metrics(model, batch) -> dict`` of per-batch sums (e.g. ``correct``, ``loss_sum``,
        ``count``) that :func:`evaluate` adds up and turns into the task's metrics.
      finish: turns the summed metrics into the reported ones (``accuracy``, ``loss``,
        ``perplexity``, ...).
      checksum: SHA-256 of the dataset files (or of the generated arrays).
      description: one line for the protocol record.
      pretrained: the models come trained (loaded from a checkpoint): the runner does not train them.
      diagnostic_examples: test examples the per-layer diagnostics of a record run on.
      diagnostic_length: if > 0, the diagnostics see only the first ``diagnostic_length`` positions
        of each example's second axis (tokens of a long sequence).
      predictions: ``predictions(model, batch) -> (logits, targets)``: the logits ``(..., C)`` of
        every prediction the loss scores and their integer targets ``(...)`` (a language model:
        ``(B, L-1, V)`` next-token logits); what distillation matches against a teacher.
        ``None``: the task cannot be distilled.
    """

    name: str
    train: Split
    test: Split
    models: dict[str, Callable[..., nnx.Module]]
    loss: Callable[[nnx.Module, Any], jax.Array]
    metrics: Callable[[nnx.Module, Any], dict[str, jax.Array]]
    finish: Callable[[dict[str, float]], dict[str, float]]
    checksum: str
    description: str
    pretrained: bool = False
    diagnostic_examples: int = 256
    diagnostic_length: int = 0
    predictions: Callable[[nnx.Module, Any], tuple[jax.Array, jax.Array]] | None = None

    def make_model(self, model: str, model_args: dict[str, Any], seed: int) -> nnx.Module:
        if model not in self.models:
            raise ValueError(
                f"task.model={model!r} is not a model of task {self.name!r}; use one of {sorted(self.models)}"
            )
        return self.models[model](rngs=nnx.Rngs(seed), **model_args)


def evaluate(
    task: Task,
    model: nnx.Module,
    batch_size: int,
    limit: int = 0,
    take: Callable[[Split, np.ndarray], Any] | None = None,
) -> dict[str, float]:
    """The task's metrics of ``model`` over its test split (jitted per batch shape); ``take(split,
    idx)`` loads each batch where the model's arrays are (e.g. split over a mesh; default
    ``split.take``)."""
    step = nnx.jit(task.metrics)
    totals: dict[str, float] = {}
    for idx in task.test.index_batches(batch_size, limit):
        batch = task.test.take(idx) if take is None else take(task.test, idx)
        for key, value in step(model, batch).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return task.finish(totals)
