"""Block-scaled FP8: e4m3 x e4m3 with one scale per token and 128-wide K group of the activations
and one per 128 x 128 block of the weight, float32 accumulation (the DeepSeek-V3 recipe).

.. math::

    y_{mn} = \\sum_g s^x_{mg}\\, s^w_{g,\\lfloor n/128 \\rfloor}
             \\sum_{k \\in \\text{group } g} q^x_{mk} q^w_{kn} + b_n,
    \\qquad \\text{group } g = \\{128 g, \\ldots, 128 g + 127\\}.

Each group's partial sum is a float32 dot (e4m3 products are exact in float32), scaled by its
two scales and added to a float32 accumulator: the scales cannot leave the K loop, unlike the
per-row / per-column scales of :mod:`qjax.kernels.fp8`, since they change along K.

Backends (:mod:`qjax.kernels.blocks` picks; the block table's ``"fp8"`` entries give ``block_m``
and ``block_n``, ``block_k`` is the group, 128):

* **GPU** (Triton): grid ``(M/block_m, N/block_n, K ranges)``; a ``fori_loop`` over the groups of
  its K range loads a ``(block_m, 128)`` slice of ``x`` and a ``(128, block_n)`` slice of ``w``, one
  ``(block_m, 1)`` column of the activation scales and one ``(1, block_n)`` row of the weight
  scales (expanded to one per column outside the kernel: ``K/128 x N`` floats). As in
  :mod:`qjax.kernels.w8a8`, ``x`` and its scales are not padded to the M block (masked rows), and K
  is split into ranges when the ``(M, N)`` grid is too small to fill the GPU (``split_k``), their
  float32 partial sums added by XLA.
* **TPU** (Mosaic): grid ``(M/block_m, N/block_n, K/128)`` with K ``"arbitrary"``, a VMEM
  accumulator; the scales come as ``(K/128, M, 1)`` and ``(K/128, 1, N)`` arrays whose group axis
  is squeezed out of the blocks, so every block respects the (8, 128) tiling. Tiles are upcast to
  bfloat16 for the MXU (exact).
* **Interpret**: the GPU body (and, in the tests, the TPU body) in the Pallas interpreter.

Shapes that are not multiples of the blocks are zero-padded (zero scales and values add nothing;
on GPU, M is masked instead).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qjax.kernels import blocks as kb
from qjax.kernels.w8a8 import (
    _W_DOCS,
    _as_kn,
    _dot,
    check_bias,
    check_contraction,
    check_operand,
    check_out_dtype,
    gpu_weight_spec,
    tpu_weight_spec,
)

FP8 = jnp.float8_e4m3fn
GROUP = 128


def _check(
    x_q: Any, x_scale: Any, w_q: Any, w_scale: Any, bias: Any, out_dtype: Any, w_layout: str = "kn"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None, jnp.dtype]:
    x_q = check_operand(x_q, "x_q", FP8, "of shape (M, K)", "quantize per token and 128-wide K group")
    w_hint = "quantize per 128 x 128 block to float8_e4m3fn"
    w_q = check_operand(w_q, "w_q", FP8, _W_DOCS.get(w_layout, ""), w_hint)
    check_contraction(x_q, w_q, "x_q", "w_q", w_layout)
    (m, k), n = x_q.shape, w_q.shape[0 if w_layout == "nk" else 1]
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


def _column_scales(w_scale: jax.Array, n: int) -> jax.Array:
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
    w_layout: str = "kn",
) -> jax.Array:
    """:func:`fp8_block_matmul` in plain ``jax.numpy``: each group's float32 dot at full precision,
    scaled by its two scales, summed over the groups in order; the bias; the cast."""
    x_q, xs, w_q, ws, b, dt = _check(x_q, x_scale, w_q, w_scale, bias, out_dtype, w_layout)
    w_q = _as_kn(w_q, w_layout)
    m, n = x_q.shape[0], w_q.shape[1]
    g = xs.shape[1]
    x = kb.pad_axis(x_q.astype(jnp.float32), 1, GROUP).reshape(m, g, GROUP)
    w = kb.pad_axis(w_q.astype(jnp.float32), 0, GROUP).reshape(g, GROUP, n)
    parts = jnp.einsum("mgk,gkn->gmn", x, w, precision=lax.Precision.HIGHEST)  # (G, M, N)
    scaled = parts * xs.T[:, :, None] * _column_scales(ws, n)[:, None, :]
    acc = lax.fori_loop(0, g, lambda i, a: a + scaled[i], jnp.zeros((m, n), jnp.float32))
    if b is not None:
        acc = acc + b
    return acc.astype(dt)


class _Static(NamedTuple):
    """What the kernel bodies know at trace time."""

    groups: int
    has_bias: bool
    out_dtype: Any
    w_nk: bool
    steps: int = 0  # GPU: groups per K range (the last range may be shorter)
    rows: int = 0  # GPU: M, the rows of x and of the output (the last M block is masked)


def _gpu_kernel(x_ref: Any, w_ref: Any, xs_ref: Any, ws_ref: Any, *refs: Any, st: _Static) -> None:
    # x_ref (bm, Kp) and xs_ref (bm, G) of the M rows of x (the last M block masked), w_ref (Kp, bn)
    # or (bn, Kp) if w_nk, ws_ref (G, bn); refs: [bias (1, bn)], o_ref (bm, bn), or (1, bm, bn)
    # float32 partial sums of K range program_id(2) when K is split
    o_ref = refs[-1]
    bm, bn = o_ref.shape[-2:]
    x_mask = None if st.rows % bm == 0 else kb.row_mask((bm, GROUP), bm, st.rows)
    s_mask = None if st.rows % bm == 0 else kb.row_mask((bm, 1), bm, st.rows)
    step_of = kb.k_range(st.steps, st.groups)

    def step(s: jax.Array, acc: jax.Array) -> jax.Array:
        i, keep = step_of(s)
        start = pl.multiple_of(i * GROUP, GROUP)
        w = w_ref[:, pl.ds(start, GROUP)] if st.w_nk else w_ref[pl.ds(start, GROUP), :]
        x = kb.load_rows(x_ref.at[:, pl.ds(start, GROUP)], st.rows, bm, x_mask)
        part = _dot(x, w, jnp.float32, None, st.w_nk)  # (bm, bn)
        xs = kb.load_rows(xs_ref.at[:, pl.ds(i, 1)], st.rows, bm, s_mask)  # (bm, 1)
        ws = ws_ref[pl.ds(i, 1), :]  # (1, bn)
        return acc + part * xs * (ws if keep is None else ws * keep)

    acc = lax.fori_loop(0, st.steps, step, jnp.zeros((bm, bn), jnp.float32))
    if st.has_bias:
        acc = acc + refs[0][...]
    kb.store_rows(o_ref, acc.astype(o_ref.dtype).reshape(o_ref.shape), st.rows)


def _tpu_kernel(x_ref: Any, w_ref: Any, xs_ref: Any, ws_ref: Any, *refs: Any, st: _Static) -> None:
    # x_ref (bm, 128), w_ref (128, bn) or (bn, 128) if w_nk, xs_ref (bm, 1), ws_ref (1, bn); refs:
    # [bias (1, bn)], o_ref, acc_ref (bm, bn) f32 in VMEM
    o_ref, acc_ref = refs[-2], refs[-1]
    g = pl.program_id(2)

    @pl.when(g == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    part = _dot(x_ref[...], w_ref[...], jnp.float32, jnp.bfloat16, st.w_nk)  # bf16 holds every e4m3 value
    acc_ref[...] += part * xs_ref[...] * ws_ref[...]

    @pl.when(g == st.groups - 1)
    def _finish() -> None:
        acc = acc_ref[...]
        if st.has_bias:
            acc = acc + refs[0][...]
        o_ref[...] = acc.astype(st.out_dtype)


def fp8_block_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
    blocks: kb.Blocks | Mapping[str, Any] | None = None,
    backend: str | None = None,
    body: str | None = None,
    w_layout: str = "kn",
    split_k: int | None = None,
) -> jax.Array:
    """E4M3 x E4M3 matmul with per-(token, 128-wide K group) activation scales and per-128 x 128
    block weight scales (module docstring).

    Args:
      x_q: float8_e4m3fn ``(M, K)``.
      x_scale: float32 ``(M, ceil(K/128))``.
      w_q: float8_e4m3fn ``(K, N)``, or ``(N, K)`` with ``w_layout="nk"`` (K contiguous: the
        operand Hopper's fp8 tensor cores read, see :mod:`qjax.kernels.w8a8`).
      w_scale: float32 ``(ceil(K/128), ceil(N/128))`` in either layout.
      bias: float ``(N,)`` or ``None``.
      out_dtype: float32, bfloat16 or float16.
      blocks: overrides of the ``"fp8"`` block table (``block_m``, ``block_n``, launch
        parameters; ``block_k`` is always 128).
      backend: ``"gpu"``, ``"tpu"``, ``"interpret"`` or ``None`` (the default device's).
      body: ``"gpu"`` or ``"tpu"``: which body the interpreter runs (tests); default by backend.
      w_layout: ``"kn"`` or ``"nk"`` (see ``w_q``).
      split_k: K ranges (of whole groups) run by separate programs of the GPU body, their float32
        partial sums added by XLA; ``None``: on ``"gpu"`` enough to fill the GPU when the (M, N) grid
        is small (:func:`qjax.kernels.blocks.split_k_ranges`), else one.
    """
    x_q, xs, w_q, ws, b, dt = _check(x_q, x_scale, w_q, w_scale, bias, out_dtype, w_layout)
    w_nk = w_layout == "nk"
    be = kb.resolve_backend(backend)
    if be == "mosaic_gpu":
        raise ValueError(
            "fp8_block_matmul has no 'mosaic_gpu' backend; use 'gpu' (Triton), 'tpu' or 'interpret'"
        )
    body = body or ("tpu" if be == "tpu" else "gpu")
    if body not in ("gpu", "tpu"):
        raise ValueError(f"body={body!r}: expected 'gpu' or 'tpu'")
    m, n = x_q.shape[0], w_q.shape[0 if w_nk else 1]
    groups = xs.shape[1]
    chosen = kb.choose_blocks("fp8", be, m, blocks)
    bl = kb.Blocks(chosen.block_m, chosen.block_n, GROUP, chosen.num_warps, chosen.num_stages)
    if be == "tpu" and (bl.block_m % 32 or bl.block_n % 128):
        raise ValueError(f"blocks={bl}: Mosaic tiles need block_m a multiple of 32 and block_n of 128")
    bm, bn = bl.block_m, bl.block_n
    n_block, k_block = (bn, GROUP) if w_nk else (GROUP, bn)  # the blocks of w's axes 0 and 1
    wp = kb.pad_axis(kb.pad_axis(w_q, 0, n_block), 1, k_block)  # (Np, Kp) or (Kp, Np)
    kp = wp.shape[1 if w_nk else 0]
    np_ = wp.shape[0 if w_nk else 1]
    mp = kb.round_up(m, bm)
    ws_p = kb.pad_axis(_column_scales(ws, n), 1, bn)  # (G, Np)
    extra = [] if b is None else [kb.pad_axis(b, 1, bn)]  # (1, Np)
    split = 1
    if body == "gpu":  # x and its scales not padded to the M block (masked rows)
        split, per = kb.split_k_ranges(
            (mp // bm) * (np_ // bn), groups, 1 if split_k is None and be != "gpu" else split_k
        )
        fused_bias = split == 1
        kw = {
            "st": _Static(
                groups, b is not None and fused_bias, dt if fused_bias else jnp.float32, w_nk, per, m
            )
        }
        grid: tuple[int, ...] = (mp // bm, np_ // bn, split)
        in_specs = [
            pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)),
            gpu_weight_spec(kp, bn, w_nk),
            pl.BlockSpec((bm, groups), lambda i, j, s: (i, 0)),
            pl.BlockSpec((groups, bn), lambda i, j, s: (0, j)),
        ] + [pl.BlockSpec((1, bn), lambda i, j, s: (0, j)) for _ in extra if fused_bias]
        if split == 1:
            out_shape = jax.ShapeDtypeStruct((m, np_), dt)
            out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
        else:
            out_shape = jax.ShapeDtypeStruct((split, m, np_), jnp.float32)
            out_spec = pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j))
        fn: Any = functools.partial(_gpu_kernel, **kw)
        scratch: list[Any] = []
        semantics: tuple[str, ...] = ("parallel", "parallel", "arbitrary")
        operands = [kb.pad_axis(x_q, 1, GROUP), wp, xs, ws_p, *(extra if fused_bias else [])]
    elif split_k not in (None, 1):
        raise ValueError(f"split_k={split_k}: K is split on GPU (Triton) only; the TPU body takes none")
    else:
        kw = {"st": _Static(groups, b is not None, dt, w_nk)}
        xp = kb.pad_axis(kb.pad_axis(x_q, 0, bm), 1, GROUP)  # (Mp, Kp)
        xs_p = kb.pad_axis(xs, 0, bm)  # (Mp, G)
        out_shape = jax.ShapeDtypeStruct((mp, np_), dt)
        from jax.experimental.pallas import tpu as pltpu

        grid = (mp // bm, np_ // bn, groups)
        sq = pl.squeezed
        in_specs = [
            pl.BlockSpec((bm, GROUP), lambda i, j, g: (i, g)),
            tpu_weight_spec(GROUP, bn, w_nk),
            pl.BlockSpec((sq, bm, 1), lambda i, j, g: (g, i, 0)),  # (G, Mp, 1): the group squeezed
            pl.BlockSpec((sq, 1, bn), lambda i, j, g: (g, 0, j)),  # (G, 1, Np)
        ] + [pl.BlockSpec((1, bn), lambda i, j, g: (0, j)) for _ in extra]
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, g: (i, j))
        fn = functools.partial(_tpu_kernel, **kw)
        scratch = [pltpu.VMEM((bm, bn), jnp.float32)]
        semantics = ("parallel", "parallel", "arbitrary")
        operands = [xp, wp, xs_p.T[:, :, None], ws_p[:, None, :], *extra]
    out = pl.pallas_call(
        fn,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        scratch_shapes=scratch,
        compiler_params=kb.compiler_params(be, bl, semantics),
        interpret=be == "interpret",
        name="qjax_fp8_block",
    )(*operands)
    if split == 1:
        return out[:m, :n]
    y = out[:, :, :n].sum(axis=0)  # the real rows and columns of the partial sums only
    return (y if b is None else y + b[:, :n]).astype(dt)
