"""sklearn's 8x8 digits (1797 images, ships with scikit-learn): a tiny task for fast tests.

Pixels are scaled from 0..16 to [0, 1]; a fixed split (permutation of ``default_rng(0)``) puts 1/4
of the images (449) in the test set and 1348 in the training set. Models: ``mlp``, ``cnn``.
"""

from __future__ import annotations

import hashlib

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments.tasks import ImageMLP, classification_task
from experiments.tasks.base import Task


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``; images as float32 (N, 8, 8, 1) in [0, 1]."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    x = (data.images.astype(np.float32) / 16.0)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 4
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


class MLP(ImageMLP):
    """64 -> hidden -> hidden -> 10 with ReLU."""

    def __init__(self, hidden: int = 64, *, rngs: nnx.Rngs):
        super().__init__(64, hidden, rngs=rngs)


class CNN(nnx.Module):
    """conv 3x3 (16) -> conv 3x3 stride 2 (32) -> linear 10, ReLU between."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.head(x.reshape(x.shape[0], -1))


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


MODELS = {"mlp": MLP, "cnn": CNN}


def make_task(data_dir: str | None = None) -> Task:
    """The digits :class:`Task` (``data_dir`` is ignored: the data ships with scikit-learn).

    ``checksum`` is the SHA-256 of the four split arrays' bytes, in the order of :func:`load_digits`.
    """
    arrays = load_digits()
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    n_train, n_test = len(arrays[1]), len(arrays[3])
    description = (
        f"sklearn digits: {n_train} train / {n_test} test images 8x8x1 in [0, 1], 10 classes, "
        "split by permutation seed 0"
    )
    return classification_task("digits", arrays, MODELS, digest.hexdigest(), description)
