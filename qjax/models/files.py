"""Checks shared by the model-file loaders: a tensor read from a file is whole and finite."""

from __future__ import annotations

import os

import numpy as np


def require_finite(values: np.ndarray, tensor: str, source: str | os.PathLike[str]) -> np.ndarray:
    """``values`` if every entry is finite; else a ``ValueError`` naming the tensor, the file and
    how many entries are NaN or Inf."""
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(
            f"{source}: tensor {tensor!r} holds {bad} non-finite values (NaN or Inf) of {values.size}: "
            "the file is damaged; download or export it again"
        )
    return values


def require_size(
    values: np.ndarray, shape: tuple[int, ...], tensor: str, source: str | os.PathLike[str]
) -> np.ndarray:
    """``values`` reshaped to ``shape`` (the file header's) if it holds that many entries; else a
    ``ValueError`` saying the file is truncated."""
    expected = int(np.prod(shape))
    if values.size != expected:
        raise ValueError(
            f"{source}: tensor {tensor!r} holds {values.size} values, its header says {expected} "
            f"(shape {shape}): the file is truncated or damaged; download or export it again"
        )
    return values.reshape(shape)
