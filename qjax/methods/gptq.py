"""GPTQ on a whole model, block by block (the math is :mod:`qjax.methods.gptq_core`).

For each :class:`~qjax.methods.sequential.Block` in order, and each of its groups in order, the
inputs :math:`X` that the group's linears receive are recorded with every earlier layer already
quantized (their kernels replaced by the quantized weights), :math:`H = 2 X^\\top X / n` is formed
once per group, and each linear of the group is quantized by :func:`gptq_quantize` with that
:math:`H`. The quantized weight replaces the kernel at once, so the next group and the next block
see it; the hidden states passed to the next block are the quantized block's outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qjax.methods.gptq_core import gptq_quantize, hessian
from qjax.methods.sequential import Block, group_input
from qjax.numerics import QParams, QuantSpec

logger = logging.getLogger("qjax.methods.gptq")


def gptq_blocks(
    blocks: Sequence[Block],
    hidden: jax.Array,
    spec_of: Callable[[str], QuantSpec | None],
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    report: list[dict[str, Any]] | None = None,
) -> dict[str, tuple[jax.Array, QParams]]:
    """Quantize the linears of ``blocks`` with GPTQ, in place; returns ``{path: (w_hat, qparams)}``
    for :func:`~qjax.methods.sequential.pin_weights`.

    ``hidden`` is the first block's input on the calibration data; ``spec_of(path)`` the weight
    spec of a linear (``None``: left in float). ``act_order`` uses static groups (a stored weight
    keeps its groups contiguous). ``report``, when given, receives one dict per linear: ``path``,
    GPTQ's output error ``error`` and round-to-nearest's ``rtn_error`` (both
    :math:`\\|X \\Delta W\\|^2 / n` on the calibration inputs) and ``seconds``.
    """
    pinned: dict[str, tuple[jax.Array, QParams]] = {}
    h = hidden
    for b, block in enumerate(blocks):
        for g, group in enumerate(block.groups):
            specs = [(path, layer, spec_of(path)) for path, layer in group]
            if all(spec is None for _, _, spec in specs):
                continue
            x = group_input(block, g, h)
            hess = hessian(x)
            for path, layer, spec in specs:
                if spec is None:
                    continue
                start = time.perf_counter()
                res = gptq_quantize(
                    jnp.asarray(layer.kernel[...], jnp.float32),
                    spec,
                    h=hess,
                    damp=damp,
                    block_size=block_size,
                    act_order=act_order,
                    static_groups=act_order,
                )
                layer.kernel.set_value(res.w_hat.astype(layer.kernel[...].dtype))
                pinned[path] = (res.w_hat, res.qparams)
                row = {
                    "path": path,
                    "error": float(res.error),
                    "rtn_error": float(res.rtn_error),
                    "seconds": time.perf_counter() - start,
                }
                logger.info("gptq %s: error %.4g (rtn %.4g)", path, row["error"], row["rtn_error"])
                if report is not None:
                    report.append(row)
        h = block.run(h)
        logger.info("gptq block %d done", b)
    return pinned
