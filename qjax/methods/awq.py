"""AWQ on a whole model, block by block (the math is :mod:`qjax.methods.awq_core`).

For each :class:`~qjax.methods.sequential.Block` (with ``folds``: for each group, a function that
divides the producer of the group's input by a per-channel scale, or ``None`` where no producer can
absorb one), as in the reference implementation:

1. the inputs :math:`X_g` of every group are recorded from the float block;
2. for each group with a fold, :func:`awq_search` picks :math:`s_g`; the producer is divided by
   :math:`s_g` (``fold``) and the group's kernels multiplied row-wise by :math:`s_g`, which leaves the
   block's float function unchanged;
3. with every scale of the block in place, :func:`awq_clip_search` picks each linear's clipped grid
   on its scaled kernel and scaled inputs :math:`X_g / s_g`;
4. the next block's input is the (unchanged) float output of this block.

The kernels keep their scaled float values until :func:`~qjax.methods.sequential.pin_weights`
installs the returned quantized weights and grids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qjax.methods.awq_core import awq_clip_search, awq_search
from qjax.methods.sequential import Block, capture_inputs
from qjax.numerics import QParams, QuantSpec, calibrate, quantize_dequantize

logger = logging.getLogger("qjax.methods.awq")
Fold = Callable[[jax.Array], None]


def _group_inputs(block: Block, h: jax.Array) -> list[jax.Array]:
    firsts = [group[0][1] for group in block.groups]
    with capture_inputs(firsts) as captured:
        block.run(h)
    return [jnp.concatenate(c, axis=0) for c in captured]


def awq_blocks(
    blocks: Sequence[Block],
    folds: Sequence[Sequence[Fold | None]],
    hidden: jax.Array,
    spec_of: Callable[[str], QuantSpec | None],
    *,
    grid: int = 20,
    clip: bool = True,
    report: list[dict[str, Any]] | None = None,
) -> dict[str, tuple[jax.Array, QParams]]:
    """Scale, fold and clip the linears of ``blocks`` (in place; see the module docstring); returns
    ``{path: (w_hat, qparams)}`` for :func:`~qjax.methods.sequential.pin_weights`.

    ``folds[b][g]`` belongs to ``blocks[b].groups[g]``. ``report`` receives one dict per group
    (``paths``, ``alpha``, ``error``, ``rtn_error``) and per linear (``path``, ``clip_error``,
    ``unclipped_error``).
    """
    if len(folds) != len(blocks):
        raise ValueError(f"folds has {len(folds)} entries for {len(blocks)} blocks; give one per block")
    pinned: dict[str, tuple[jax.Array, QParams]] = {}
    h = hidden
    for b, (block, block_folds) in enumerate(zip(blocks, folds, strict=True)):
        xs = _group_inputs(block, h)
        for g, (group, fold) in enumerate(zip(block.groups, block_folds, strict=True)):
            spec = spec_of(group[0][0])
            if spec is None or fold is None:
                continue
            kernels = [jnp.asarray(layer.kernel[...], jnp.float32) for _, layer in group]
            res = awq_search(xs[g], kernels, spec, grid=grid)
            fold(res.scales)
            for (_, layer), w in zip(group, kernels, strict=True):
                layer.kernel.set_value((w * res.scales[:, None]).astype(layer.kernel[...].dtype))
            xs[g] = xs[g] / res.scales[None, :]
            row = {
                "paths": [p for p, _ in group],
                "alpha": float(res.alpha),
                "error": float(res.error),
                "rtn_error": float(res.rtn_error),
            }
            logger.info(
                "awq %s: alpha %.2f, error %.4g (rtn %.4g)",
                row["paths"],
                row["alpha"],
                row["error"],
                row["rtn_error"],
            )
            if report is not None:
                report.append(row)
        for g, group in enumerate(block.groups):
            for path, layer in group:
                spec = spec_of(path)
                if spec is None:
                    continue
                w = jnp.asarray(layer.kernel[...], jnp.float32)
                if clip:
                    cr = awq_clip_search(xs[g], w, spec, grid=grid)
                    pinned[path] = (cr.w_hat, cr.qparams)
                    if report is not None:
                        errors = {"clip_error": float(cr.error), "unclipped_error": float(cr.unclipped_error)}
                        report.append({"path": path, **errors})
                else:
                    qp = calibrate(w, spec)
                    pinned[path] = (quantize_dequantize(w, spec, qparams=qp), qp)
        h = block.run(h)
        logger.info("awq block %d done", b)
    return pinned
