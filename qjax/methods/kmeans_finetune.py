"""k-means codebook quantization with centroid fine-tuning (Deep Compression, Han et al. 2016).

A weight is quantized to :math:`K = 2^b` shared values per block (the whole tensor, or one output
channel): k-means with centroids initialised linearly between the block's min and max (the
initialisation the paper found best), then Lloyd iterations (:mod:`qjax.numerics.kmeans`). During
fine-tuning the cluster indices stay fixed and the centroids are trained; the weight is
:math:`W_i = c_{b(i),\\, \\mathrm{idx}_i}` and the gradient of a centroid is the sum of the gradients
of the weights assigned to it:

.. math::

    \\frac{\\partial L}{\\partial c_{b,k}} = \\sum_{i \\in b:\\ \\mathrm{idx}_i = k}
        \\frac{\\partial L}{\\partial W_i}.

The model integration is in :mod:`qjax.nn`: a rule with a ``kmeans<b>`` weight spec and
``weight_estimator='kmeans_finetune'`` makes each layer hold ``centroids`` (``nnx.Param``, shape
``grid + (K,)``) and ``indices`` (:class:`qjax.nn.ops.CodebookIndices`, fixed) from k-means at
``quantize_model`` time; the qat forward uses :func:`qjax.ste.codebook_weight` (a gather, whose autodiff
is exactly the sum above: :func:`centroid_gradient` is the same formula written out, for checks and
custom loops), and ``convert`` stores packed indices plus the trained codebook.

Storage of a weight of :math:`n` elements in :math:`G` blocks: :math:`n` indices of :math:`b` bits,
bit-packed (:mod:`qjax.numerics.packing`; 8-bit indices one per byte; each row padded to whole
bytes), plus :math:`G K` float32 centroids, so the ratio to float32 is

.. math::

    r = \\frac{32 n}{b\\, n + 32 G K}

up to the row padding: the paper's :math:`n b / (n \\log_2 K + K b)` with one codebook per
block. The paper's settings (AlexNet): 8-bit conv and 5-bit fully connected codebooks, after pruning,
fine-tuned with SGD; here bits, granularity and the optimiser come from the config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from qjax.nn.model import quantized_ops
from qjax.nn.rules import Rule
from qjax.numerics import QArray, QuantSpec, packing, tiling
from qjax.numerics.formats import CodebookFormat
from qjax.ste import Estimator


def _codebook_format(spec: QuantSpec, fn: str) -> CodebookFormat:
    fmt = spec.format
    if not isinstance(fmt, CodebookFormat):
        raise ValueError(f"{fn} needs a kmeans spec (kmeans1..kmeans8); got dtype={spec.dtype!r}")
    return fmt


def centroid_gradient(weight_grad: jax.Array, indices: jax.Array, spec: QuantSpec) -> jax.Array:
    """The centroid gradient of the module docstring, a segment sum per block:
    :math:`\\partial L/\\partial c_{b,k} = \\sum_{i \\in b,\\ \\mathrm{idx}_i = k} \\partial L/\\partial W_i`,
    shape ``grid + (2**bits,)``.

    Args:
      weight_grad: :math:`\\partial L/\\partial W` at :math:`W = C[\\mathrm{idx}]`, the weight's shape.
      indices: the cluster index of each weight, the weight's shape.
      spec: the ``kmeans<b>`` spec (its granularity defines the blocks).
    """
    fmt = _codebook_format(spec, "centroid_gradient")
    if tuple(weight_grad.shape) != tuple(indices.shape):
        raise ValueError(
            f"weight_grad has shape {tuple(weight_grad.shape)} but indices {tuple(indices.shape)}; "
            "pass the gradient of the weight the indices belong to"
        )
    k = 2**fmt.bits
    block = tiling.block_shape(indices.shape, spec)
    grid = tiling.grid_shape(indices.shape, block)
    g = tiling.blocks_last(jnp.asarray(weight_grad), block).reshape(-1, tiling.block_size(block))
    idx = tiling.blocks_last(jnp.asarray(indices).astype(jnp.int32), block).reshape(g.shape)
    sums = jax.vmap(lambda gi, ii: jax.ops.segment_sum(gi, ii, num_segments=k))(g, idx)
    return sums.reshape((*grid, k))


def compression_ratio(shape: Sequence[int], spec: QuantSpec, original_bits: int = 32) -> float:
    """The ratio :math:`r` of the module docstring for a weight of ``shape`` under ``spec``
    (what :meth:`QArray.compression_ratio` measures on the stored tensor)."""
    fmt = _codebook_format(spec, "compression_ratio")
    shape = tuple(shape)
    blocks = math.prod(tiling.grid_shape(shape, tiling.block_shape(shape, spec)))
    rows, last = math.prod(shape[:-1]), shape[-1]
    index_bytes = rows * packing.packed_length(last, fmt.container_bits)  # rows padded to whole bytes
    n = math.prod(shape)
    return n * original_bits / (8 * (index_bytes + 4 * blocks * 2**fmt.bits))


def finetune_rules(rules: Iterable[Rule | Mapping[str, Any]]) -> list[Rule]:
    """``rules`` with every rule that has a ``kmeans<b>`` weight spec switched to
    ``weight_estimator='kmeans_finetune'`` (other rules unchanged)."""
    out = []
    for r in rules:
        rule = r if isinstance(r, Rule) else Rule.from_dict(r)
        if rule.weights is not None and isinstance(rule.weights.format, CodebookFormat):
            rule = dataclasses.replace(rule, weight_estimator=Estimator.KMEANS_FINETUNE)
        out.append(rule)
    return out


def codebooks(model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{path: (centroids, indices)}`` of every layer fine-tuning a codebook (qat mode) or
    storing one (converted: the ``QArray``'s codebook and unpacked indices)."""
    out: dict[str, tuple[jax.Array, jax.Array]] = {}
    for path, layer, op in quantized_ops(model):
        centroids = getattr(op, "centroids", None)
        indices = getattr(op, "indices", None)
        if centroids is not None and indices is not None:
            out[path] = (centroids[...], indices[...])
            continue
        stored = getattr(layer, "embedding" if isinstance(layer, nnx.Embed) else "kernel")[...]
        if isinstance(stored, QArray) and stored.codebook is not None:
            out[path] = (stored.codebook, stored.values)
    return out


def storage(model: nnx.Module) -> dict[str, dict[str, float]]:
    """Real storage of a converted model's quantized kernels: ``{path: {weight_bytes,
    float32_bytes, compression_ratio}}`` plus a ``"total"`` row over all of them."""
    rows: dict[str, dict[str, float]] = {}
    for path, layer, _ in quantized_ops(model):
        stored = getattr(layer, "embedding" if isinstance(layer, nnx.Embed) else "kernel")[...]
        if isinstance(stored, QArray):
            float_bytes = 4 * math.prod(stored.shape)
            rows[path] = {
                "weight_bytes": stored.nbytes,
                "float32_bytes": float_bytes,
                "compression_ratio": stored.compression_ratio(),
            }
    if not rows:
        raise ValueError("the model has no stored quantized kernels; convert it first with qjax.nn.convert")
    total_q = sum(r["weight_bytes"] for r in rows.values())
    total_f = sum(r["float32_bytes"] for r in rows.values())
    rows["total"] = {
        "weight_bytes": total_q,
        "float32_bytes": total_f,
        "compression_ratio": total_f / total_q,
    }
    return rows


__all__ = ["centroid_gradient", "codebooks", "compression_ratio", "finetune_rules", "storage"]
