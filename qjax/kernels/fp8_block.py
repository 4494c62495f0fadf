"""Block-scaled FP8: e4m3 x e4m3 with one scale per token and 128-wide K group of the activations
and one per 128 x 128 block of the weight, float32 accumulation (the DeepSeek-V3 recipe).

.. math::

    y_{mn} = \\sum_g s^x_{mg}\\, s^w_{g,\\lfloor n/128 \\rfloor}
             \\sum_{k \\in \\text{group } g} q^x_{mk} q^w_{kn} + b_n,
    \\qquad \\text{group } g = \\{128 g, \\ldots, 128 g + 127\\}.

Each group's partial sum is a float32 dot (e4m3 products are exact in float32), scaled by its two
scales and added to a float32 accumulator: the scales change along K, so they stay inside the K
loop. The grid is that of :mod:`qjax.kernels.launch` with ``block_k`` = 128, one group a K step
(``block_m`` and ``block_n`` from the ``"fp8"`` block table entries). The weight scales enter the
kernel as one per column, ``(K/128, N)``. The TPU body takes the scales as ``(K/128, M, 1)`` and
``(K/128, 1, N)`` arrays whose group axis is squeezed out of the blocks (Mosaic's (8, 128) tiling)
and upcasts the tiles to bfloat16 for the MXU (exact).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Unpack

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qjax.kernels.backend import Backend, Body, resolve_backend, resolve_body
from qjax.kernels.common import (
    E4M3,
    KN,
    X_DOC,
    WeightLayout,
    check_bias,
    check_contraction,
    check_operand,
    check_out_dtype,
    epilogue,
    pad_axis,
)
from qjax.kernels.launch import KRanges, LaunchOptions, launch, load_rows, plan_grid, row_mask, store_rows
from qjax.kernels.tuning import Blocks, choose_blocks

GROUP = 128

Operands = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None, jnp.dtype]


def check_fp8_block(
    x_q: Any,
    x_scale: Any,
    w_q: Any,
    w_scale: Any,
    *,
    bias: Any = None,
    out_dtype: Any = jnp.bfloat16,
    layout: WeightLayout = KN,
) -> Operands:
    """The operands of :func:`fp8_block_matmul` checked: ``(x_q, x_scale, w_q, w_scale, bias (1, N)
    or None, out dtype)``, the scales float32."""
    x_q = check_operand(x_q, "x_q", E4M3, X_DOC, "quantize per token and 128-wide K group")
    w_hint = "quantize per 128 x 128 block to float8_e4m3fn"
    w_q = check_operand(w_q, "w_q", E4M3, f"of shape {layout.shape_doc}", w_hint)
    check_contraction(x_q, w_q, "x_q", "w_q", layout)
    (m, k), n = x_q.shape, w_q.shape[layout.n_axis]
    g, gn = -(-k // GROUP), -(-n // GROUP)
    for name, s, shape, doc in (
        ("x_scale", x_scale, (m, g), "one per token and 128-wide K group: (M, ceil(K/128))"),
        ("w_scale", w_scale, (g, gn), "one per 128 x 128 weight block: (ceil(K/128), ceil(N/128))"),
    ):
        if not hasattr(s, "shape") or not jnp.issubdtype(jnp.result_type(s), jnp.floating):
            raise TypeError(f"{name} must be a float32 array, {doc}; got {type(s).__name__}")
        if tuple(s.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(s.shape)}, expected {shape}: {doc}")
    b = check_bias(bias, n)
    xs = jnp.asarray(x_scale).astype(jnp.float32)
    ws = jnp.asarray(w_scale).astype(jnp.float32)
    return x_q, xs, w_q, ws, b, check_out_dtype(out_dtype)


def column_scales(w_scale: jax.Array, n: int) -> jax.Array:
    """``(G, ceil(N/128))`` block scales as one per column, ``(G, N)``."""
    return jnp.repeat(w_scale, GROUP, axis=1)[:, :n]


def fp8_block_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
) -> jax.Array:
    """:func:`fp8_block_matmul` in plain ``jax.numpy``: each group's float32 dot at full precision,
    scaled by its two scales, summed over the groups in order; the bias; the cast."""
    x_q, xs, w_q, ws, b, dt = check_fp8_block(x_q, x_scale, w_q, w_scale, bias=bias, out_dtype=out_dtype)
    m, n = x_q.shape[0], w_q.shape[1]
    g = xs.shape[1]
    x = pad_axis(x_q.astype(jnp.float32), 1, GROUP).reshape(m, g, GROUP)
    w = pad_axis(w_q.astype(jnp.float32), 0, GROUP).reshape(g, GROUP, n)
    parts = jnp.einsum("mgk,gkn->gmn", x, w, precision=lax.Precision.HIGHEST)  # (G, M, N)
    scaled = parts * xs.T[:, :, None] * column_scales(ws, n)[:, None, :]
    acc = lax.fori_loop(0, g, lambda i, a: a + scaled[i], jnp.zeros((m, n), jnp.float32))
    if b is not None:
        acc = acc + b
    return acc.astype(dt)


def gpu_kernel(
    x_ref: Any,  # (block_m, Kp): the block's rows of x (the last M block masked)
    w_ref: Any,  # all of K of block_n weight columns, in `layout`
    xs_ref: Any,  # (block_m, G) activation scales
    ws_ref: Any,  # (G, block_n) weight scales, one per column
    *refs: Any,  # [bias (1, block_n)], o_ref (block_m, block_n) or (1, block_m, block_n) partial sums
    ranges: KRanges,
    has_bias: bool,
    layout: WeightLayout,
) -> None:
    o_ref = refs[-1]
    bm, bn = o_ref.shape[-2:]
    rows = ranges.rows
    x_mask = None if rows % bm == 0 else row_mask((bm, GROUP), bm, rows)
    s_mask = None if rows % bm == 0 else row_mask((bm, 1), bm, rows)
    step_of = ranges.step_of()

    def step(s: jax.Array, acc: jax.Array) -> jax.Array:
        i, keep = step_of(s)
        start = pl.multiple_of(i * GROUP, GROUP)
        x = load_rows(x_ref.at[:, pl.ds(start, GROUP)], rows, bm, x_mask)  # (block_m, 128)
        part = layout.dot(x, layout.k_slice(w_ref, start, GROUP), jnp.float32)  # (block_m, block_n)
        xs = load_rows(xs_ref.at[:, pl.ds(i, 1)], rows, bm, s_mask)  # (block_m, 1)
        ws = ws_ref[pl.ds(i, 1), :]  # (1, block_n)
        return acc + part * xs * (ws if keep is None else ws * keep)

    acc = lax.fori_loop(0, ranges.steps, step, jnp.zeros((bm, bn), jnp.float32))
    epi = {"bias": refs[0][...]} if has_bias else {}
    store_rows(o_ref, epilogue(acc, epi, o_ref.dtype).reshape(o_ref.shape), rows)


def tpu_kernel(
    x_ref: Any,  # (block_m, 128)
    w_ref: Any,  # a (128, block_n) weight tile, in `layout`
    xs_ref: Any,  # (block_m, 1): group k's activation scales
    ws_ref: Any,  # (1, block_n): group k's weight scales
    *refs: Any,  # [bias (1, block_n)], o_ref (block_m, block_n), acc_ref (block_m, block_n) f32 in VMEM
    ranges: KRanges,
    has_bias: bool,
    out_dtype: Any,
    layout: WeightLayout,
) -> None:
    o_ref, acc_ref = refs[-2], refs[-1]
    g = pl.program_id(2)

    @pl.when(g == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    x, w = x_ref[...].astype(jnp.bfloat16), w_ref[...].astype(jnp.bfloat16)  # exact for e4m3
    acc_ref[...] += layout.dot(x, w, jnp.float32) * xs_ref[...] * ws_ref[...]

    @pl.when(g == ranges.total - 1)
    def _finish() -> None:
        epi = {"bias": refs[0][...]} if has_bias else {}
        o_ref[...] = epilogue(acc_ref[...], epi, out_dtype)


def fp8_block_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
    **launch: Unpack[LaunchOptions],
) -> jax.Array:
    """E4M3 x E4M3 matmul with per-(token, 128-wide K group) activation scales and per-128 x 128
    block weight scales (module docstring).

    Args:
      x_q: float8_e4m3fn ``(M, K)``.
      x_scale: float32 ``(M, ceil(K/128))``.
      w_q: float8_e4m3fn ``(K, N)``.
      w_scale: float32 ``(ceil(K/128), ceil(N/128))``.
      bias: float ``(N,)`` or ``None``.
      out_dtype: float32, bfloat16 or float16.
      **launch: ``blocks`` (overrides of the ``"fp8"`` block table: ``block_m``, ``block_n``,
        Triton's parameters; ``block_k`` is always 128), ``backend``, ``split_k`` (K ranges of whole
        groups, their float32 partial sums added by XLA), ``body``
        (:class:`~qjax.kernels.launch.LaunchOptions`).
    """
    operands = check_fp8_block(x_q, x_scale, w_q, w_scale, bias=bias, out_dtype=out_dtype)
    return launch_fp8_block(*operands, **launch)


def launch_fp8_block(
    x_q: jax.Array,
    xs: jax.Array,
    w_q: jax.Array,
    ws: jax.Array,
    b: jax.Array | None,
    dt: jnp.dtype,
    *,
    blocks: Blocks | Mapping[str, int] | None = None,
    backend: Backend | str | None = None,
    split_k: int | None = None,
    body: Body | str | None = None,
    layout: WeightLayout = KN,
) -> jax.Array:
    """:func:`fp8_block_matmul` on operands checked by :func:`check_fp8_block` (the weight in
    ``layout``)."""
    be = resolve_backend(backend)
    bd = resolve_body(body, be)
    m, n = x_q.shape[0], w_q.shape[layout.n_axis]
    groups = xs.shape[1]
    chosen = choose_blocks("fp8", be, m, blocks)
    bl = Blocks(chosen.block_m, chosen.block_n, GROUP, chosen.num_warps, chosen.num_stages)
    if be == Backend.TPU and (bl.block_m % 32 or bl.block_n % 128):
        raise ValueError(f"blocks={bl}: Mosaic tiles need block_m a multiple of 32 and block_n of 128")
    bm, bn = bl.block_m, bl.block_n
    wp = layout.pad(w_q, bn, GROUP)  # (Kp, Np) in `layout`
    kp, np_ = wp.shape[layout.k_axis], wp.shape[layout.n_axis]
    grid = plan_grid(bd, be, bl, m=m, n_pad=np_, k_steps=groups, split_k=split_k)
    ws_p = pad_axis(column_scales(ws, n), 1, bn)  # (G, Np)
    has_bias = b is not None and grid.fused  # else added after XLA's sum of the partial sums
    x = grid.pad_rows(pad_axis(x_q, 1, GROUP))  # (M, Kp) on GPU (masked rows), (Mp, Kp) on TPU
    if bd == Body.GPU:
        operands = [x, wp, xs, ws_p]
        in_specs = [
            grid.x_spec(kp, GROUP),
            layout.gpu_spec(kp, bn),
            grid.rows_spec(groups),  # (block_m, G)
            grid.columns_spec(groups),  # (G, block_n)
        ]
        fn: Any = functools.partial(gpu_kernel, has_bias=has_bias, layout=layout)
    else:
        sq = pl.squeezed
        operands = [x, wp, grid.pad_rows(xs).T[:, :, None], ws_p[:, None, :]]
        in_specs = [
            grid.x_spec(kp, GROUP),
            layout.tpu_spec(GROUP, bn),
            pl.BlockSpec((sq, bm, 1), lambda i, j, g: (g, i, 0)),  # (G, Mp, 1): the group squeezed
            pl.BlockSpec((sq, 1, bn), lambda i, j, g: (g, 0, j)),  # (G, 1, Np)
        ]
        fn = functools.partial(tpu_kernel, has_bias=has_bias, out_dtype=dt, layout=layout)
    if b is not None and has_bias:
        operands.append(pad_axis(b, 1, bn))  # (1, Np)
        in_specs.append(grid.columns_spec(1))
    finish = functools.partial(epilogue, epi={} if b is None else {"bias": b}, out_dtype=dt)
    return launch(grid, fn, operands, in_specs, n=n, out_dtype=dt, name="qjax_fp8_block", finish=finish)
