"""A user task as a plug-in: ``blobs``, Gaussian blobs to classify, with the model ``mlp``;
registered when imported.

Each of ``classes`` classes is a Gaussian of standard deviation ``spread`` around a centre drawn
from :math:`\\mathcal{N}(0, I)` in ``features`` dimensions (one ``numpy`` generator, seed 0, so the
data and its checksum are the same in every process). Configs then say
``task: {name: blobs, model: mlp}`` and may pass ``task.data_args`` (``n_train``, ``n_test``,
``spread``) and ``task.model_args`` (``hidden``).

.. code-block:: yaml

    plugins: [examples.blobs_task]
    task: {name: blobs, model: mlp, data_args: {n_train: 512}}
"""

from __future__ import annotations

import hashlib

import flax.nnx as nnx
import jax
import numpy as np

from experiments.tasks import Task, classification_task, register_model, register_task

FEATURES, CLASSES = 16, 4


def make_blobs(
    data_dir: str | None = None, *, n_train: int = 1024, n_test: int = 256, spread: float = 0.6
) -> Task:
    """The ``blobs`` :class:`~experiments.tasks.Task` (``data_dir`` is not used: the data is
    generated); inputs float32 ``(N, 16)``, labels int32 in ``0..3``."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, n_train + n_test).astype(np.int32)
    x = (centres[y] + spread * rng.normal(size=(len(y), FEATURES))).astype(np.float32)
    arrays = (x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    description = (
        f"Gaussian blobs: {n_train} train / {n_test} test points in {FEATURES} dimensions, "
        f"{CLASSES} classes, spread {spread}, numpy seed 0"
    )
    return classification_task("blobs", arrays, {}, digest.hexdigest(), description)


class BlobMLP(nnx.Module):
    """``16 -> hidden -> 4`` with ReLU. Shapes: ``x`` (B, 16) -> logits (B, 4)."""

    def __init__(self, hidden: int = 32, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(FEATURES, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jax.nn.relu(self.fc1(x)))


register_task("blobs", make_blobs)
register_model("blobs", "mlp", BlobMLP)
