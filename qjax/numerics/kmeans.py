"""One-dimensional k-means (Lloyd's algorithm) for codebook quantization.

Each block (the whole tensor, or one channel) gets :math:`K = 2^b` centroids, initialised
linearly between the block's minimum and maximum (the initialisation Deep Compression found
best), then refined by alternating

.. math::

    i_n = \\arg\\min_k |x_n - c_k|, \\qquad c_k = \\frac{\\sum_{i_n = k} x_n}{|\\{n : i_n = k\\}|}.

In one dimension the nearest centroid is found by a binary search among the midpoints of the
sorted centroids, so memory stays linear in the block size. A centroid that loses all its points
keeps its previous value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.numerics.formats import MIN_SCALE


def assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest of the sorted ``centroids`` (shape ``(K,)``) for every ``x``."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return jnp.searchsorted(midpoints, x, side="left").astype(jnp.int32)


def _kmeans_block(x: jax.Array, k: int, iters: int) -> tuple[jax.Array, jax.Array]:
    # Cluster x / max|x| (in [-1, 1]): sums and spans of values near 3e38 would overflow.
    norm = jnp.maximum(jnp.max(jnp.abs(x)), MIN_SCALE)
    centroids, idx = _lloyd(x * (1.0 / norm), k, iters)
    # Means lie inside the data's range; clipping undoes the rescaling's last-bit overshoot.
    return jnp.clip(centroids * norm, jnp.min(x), jnp.max(x)), idx


def _lloyd(x: jax.Array, k: int, iters: int) -> tuple[jax.Array, jax.Array]:
    lo, hi = jnp.min(x), jnp.max(x)
    centroids = lo + (hi - lo) * jnp.linspace(0.0, 1.0, k, dtype=jnp.float32)

    def step(_: int, c: jax.Array) -> jax.Array:
        idx = assign(x, c)
        sums = jax.ops.segment_sum(x, idx, num_segments=k)
        counts = jax.ops.segment_sum(jnp.ones_like(x), idx, num_segments=k)
        c = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)
        return jnp.sort(c)

    centroids = jax.lax.fori_loop(0, iters, step, centroids)
    return centroids, assign(x, centroids)


def kmeans(blocks: jax.Array, k: int, iters: int) -> tuple[jax.Array, jax.Array]:
    """k-means of each row of ``blocks`` (shape ``(..., n)``).

    Returns ``(codebook, indices)``: sorted centroids of shape ``(..., k)`` and the index of each
    element's centroid, shape ``(..., n)``.
    """
    lead = blocks.shape[:-1]
    flat = blocks.reshape((-1, blocks.shape[-1])).astype(jnp.float32)
    codebook, idx = jax.vmap(lambda row: _kmeans_block(row, k, iters))(flat)
    return codebook.reshape((*lead, k)), idx.reshape(blocks.shape)


def lookup(codebook: jax.Array, indices: jax.Array) -> jax.Array:
    """``codebook[..., indices]`` row by row: the dequantized values."""
    return jnp.take_along_axis(codebook, indices.astype(jnp.int32), axis=-1)
