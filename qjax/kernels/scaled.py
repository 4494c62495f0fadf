"""The scaled matmul that W8A8, int8 and FP8 share: one contraction, the epilogue in the kernel.

.. math::

    y_{mn} = s^x_m s^w_n \\Big(\\sum_k q^x_{mk} q^w_{kn} - z^x_m \\sum_k q^w_{kn}\\Big) + b_n

with an int32 (W8A8) or float32 (FP8) accumulator that never leaves the chip: the epilogue
(:func:`qjax.kernels.common.epilogue`) runs on the output tile, or, with K split over programs,
after XLA's sum of the raw partial sums (exact for int32). The GPU and TPU bodies and the grid are
those of :mod:`qjax.kernels.launch`; the weight is read through a
:class:`~qjax.kernels.common.WeightLayout` (``(K, N)`` in the main kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qjax.kernels.backend import Backend, Body, resolve_backend, resolve_body
from qjax.kernels.common import (
    EPILOGUE_ORDER,
    KN,
    ROW_OPERANDS,
    WeightLayout,
    check_blocks,
    epilogue,
    pad_axis,
)
from qjax.kernels.launch import KRanges, launch, load_rows, plan_grid, row_mask, store_rows
from qjax.kernels.tuning import Blocks


def _tile_dot(
    x: jax.Array, w: jax.Array, layout: WeightLayout, acc_dtype: Any, operand_dtype: Any
) -> jax.Array:
    if operand_dtype is not None:  # e.g. fp8 -> bf16 on TPU: exact, and the MXU takes bf16 everywhere
        x, w = x.astype(operand_dtype), w.astype(operand_dtype)
    return layout.dot(x, w, acc_dtype)


def gpu_kernel(
    x_ref: Any,  # (block_m, Kp): the block's rows of x (the last M block masked)
    w_ref: Any,  # all of K of block_n weight columns, in `layout`
    *refs: Any,  # epilogue operands: (block_m, 1) rows, (1, block_n) columns; then the output
    names: tuple[str, ...],
    ranges: KRanges,
    block_k: int,
    acc_dtype: Any,
    out_dtype: Any,
    layout: WeightLayout,
) -> None:
    """One output tile over this program's K range; o_ref (block_m, block_n), or (1, block_m,
    block_n) raw partial sums when K is split (then ``names`` is empty)."""
    *epi_refs, o_ref = refs
    bm, bn = o_ref.shape[-2:]
    rows = ranges.rows
    x_mask = None if rows % bm == 0 else row_mask((bm, block_k), bm, rows)
    step_of = ranges.step_of()

    def step(s: jax.Array, acc: jax.Array) -> jax.Array:
        t, keep = step_of(s)
        start = pl.multiple_of(t * block_k, block_k)
        x = load_rows(x_ref.at[:, pl.ds(start, block_k)], rows, bm, x_mask)  # (block_m, block_k)
        d = _tile_dot(x, layout.k_slice(w_ref, start, block_k), layout, acc_dtype, None)
        return acc + (d if keep is None else d * keep.astype(acc_dtype))

    acc = lax.fori_loop(0, ranges.steps, step, jnp.zeros((bm, bn), acc_dtype))  # (block_m, block_n)
    epi = {
        name: load_rows(r, rows, bm) if name in ROW_OPERANDS else r[...]
        for name, r in zip(names, epi_refs, strict=True)
    }
    store_rows(o_ref, epilogue(acc, epi, out_dtype).reshape(o_ref.shape), rows)


def tpu_kernel(
    x_ref: Any,  # (block_m, block_k)
    w_ref: Any,  # a (block_k, block_n) weight tile, in `layout`
    *refs: Any,  # epilogue operands, o_ref (block_m, block_n), the VMEM accumulator (block_m, block_n)
    names: tuple[str, ...],
    ranges: KRanges,
    acc_dtype: Any,
    operand_dtype: Any,
    out_dtype: Any,
    layout: WeightLayout,
) -> None:
    *epi_refs, o_ref, acc_ref = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    acc_ref[...] += _tile_dot(x_ref[...], w_ref[...], layout, acc_dtype, operand_dtype)

    @pl.when(k == ranges.total - 1)
    def _finish() -> None:
        epi = {n: r[...] for n, r in zip(names, epi_refs, strict=True)}
        o_ref[...] = epilogue(acc_ref[...], epi, out_dtype)


def scaled_matmul(
    x: jax.Array,
    w: jax.Array,
    epi: Mapping[str, jax.Array],
    *,
    kernel: str,
    acc_dtype: Any,
    out_dtype: Any,
    tpu_operand_dtype: Any = None,
    layout: WeightLayout = KN,
    blocks: Blocks | Mapping[str, int] | None = None,
    backend: Backend | str | None = None,
    split_k: int | None = None,
    body: Body | str | None = None,
) -> jax.Array:
    """``x`` ``(M, K)`` times ``w`` (in ``layout``) with the epilogue ``epi`` (checked operands keyed
    by :data:`~qjax.kernels.common.EPILOGUE_ORDER`; empty for the raw accumulator), ``(M, N)``.
    ``kernel`` names the block table entry; ``body`` which body the interpreter runs (tests);
    ``split_k``: K ranges of the GPU body (:func:`qjax.kernels.launch.plan_grid`)."""
    be = resolve_backend(backend)
    bd = resolve_body(body, be)
    m, n = x.shape[0], w.shape[layout.n_axis]
    bl = check_blocks(kernel, be, m, blocks, jnp.dtype(x.dtype).itemsize * 8)
    bn, bk = bl.block_n, bl.block_k
    wp = layout.pad(w, bn, bk)
    kp, np_ = wp.shape[layout.k_axis], wp.shape[layout.n_axis]
    grid = plan_grid(bd, be, bl, m=m, n_pad=np_, k_steps=kp // bk, split_k=split_k)
    full = {  # the epilogue operands at full extent: row operands (M, 1), column operands (1, N)
        name: jnp.broadcast_to(a, (m, 1) if name in ROW_OPERANDS else (1, n)) for name, a in epi.items()
    }
    names = tuple(name for name in EPILOGUE_ORDER if name in epi) if grid.fused else ()
    operands = [grid.pad_rows(pad_axis(x, 1, bk)), wp]  # x (M, Kp) on GPU (masked rows), (Mp, Kp) on TPU
    in_specs = [grid.x_spec(kp, bk)]
    if bd == Body.GPU:
        in_specs.append(layout.gpu_spec(kp, bn))
        kw: dict[str, Any] = dict(block_k=bk, out_dtype=out_dtype if grid.fused else acc_dtype)
        fn: Any = functools.partial(gpu_kernel, **kw)
    else:
        in_specs.append(layout.tpu_spec(bk, bn))
        fn = functools.partial(tpu_kernel, operand_dtype=tpu_operand_dtype, out_dtype=out_dtype)
    for name in names:
        if name in ROW_OPERANDS:
            operands.append(grid.pad_rows(full[name]))
            in_specs.append(grid.rows_spec(1))
        else:
            operands.append(pad_axis(full[name], 1, bn))
            in_specs.append(grid.columns_spec(1))
    return launch(
        grid,
        functools.partial(fn, names=names, acc_dtype=acc_dtype, layout=layout),
        operands,
        in_specs,
        n=n,
        out_dtype=out_dtype,
        acc_dtype=acc_dtype,
        name=f"qjax_{kernel}",
        finish=lambda acc: epilogue(acc, full, out_dtype),
    )
