"""W8A8: int8 activations times int8 weights, int32 accumulation, a float32 epilogue in the kernel.

.. math::

    y_{mn} = s^x_m \\, s^w_n \\Big(\\sum_k q^x_{mk} q^w_{kn} - z^x_m \\sum_k q^w_{kn}\\Big) + b_n

with :math:`q^x` int8 activations (per-token or per-tensor scale :math:`s^x`, optional zero point
:math:`z^x`), :math:`q^w` symmetric int8 weights with one scale per output channel :math:`s^w` and
an optional bias :math:`b`. The sum over :math:`k` is exact (int32); the epilogue (zero-point
correction in int32, then the scales and the bias in float32) runs inside the kernel, so the int32
accumulator never leaves the chip.

The kernel has two bodies (:mod:`qjax.kernels.blocks` picks the backend):

* **GPU** (Pallas on Triton): grid ``(M/block_m, N/block_n, K ranges)``; each program holds a
  ``(block_m, K)`` row panel of ``x`` and a ``(K, block_n)`` column panel of ``w`` and walks its
  range of K in a ``fori_loop`` of ``block_k`` slices, accumulating in registers. ``x`` is not
  padded to the M block: the rows of the last block past M load as zeros (masked loads) and are not
  stored (masked stores), so decode (M = 1 in a 16-row block) reads and writes one row. When the
  ``(M, N)`` grid is too small to fill the GPU (decode, a narrow N) K is split into ranges
  (``split_k``; :func:`qjax.kernels.blocks.split_k_ranges`) whose raw partial sums (int32 for
  W8A8, so exact) XLA adds up before applying the same epilogue.
* **TPU** (Pallas on Mosaic): grid ``(M/block_m, N/block_n, K/block_k)``, K last and
  ``"arbitrary"``; a VMEM scratch accumulator is zeroed at the first K step and the epilogue
  written at the last.

**Weight layout.** ``w_layout="kn"`` (the default) takes the weight ``(K, N)``; ``w_layout="nk"``
takes it ``(N, K)``, K contiguous, and each K slice enters the dot transposed
(``dot_general`` contracting both operands' last axes: ``tt.dot(x, tt.trans(w))`` in Triton). On
Hopper the 8-bit ``wgmma`` instructions read both operands K-major from shared memory; Triton
lowers a dot with a ``(K, N)`` row-major 8-bit operand to the older ``mma.sync`` instructions
instead, and fp8 ones through fp16. Store the weight ``(N, K)`` once (``w.T``, outside the hot
path) to give Triton the K-major operand; the ``"mosaic_gpu"`` backend reads it as it is.

The interpreter (``backend="interpret"``, CPU and tests) runs the GPU body; the TPU body runs
interpreted too (``_scaled_matmul(..., body="tpu")``). Shapes that are not multiples of the blocks
are zero-padded (zeros add nothing to the contraction; on GPU, K only: M is masked) and the output
sliced back; pad weights once ahead of time (N and K multiples of the blocks) so that a call pads
only the activations, if at all.

:func:`_scaled_matmul` is shared with :mod:`qjax.kernels.fp8` (float32 accumulation).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qjax.kernels import blocks as kb

_EPILOGUE_ORDER = ("x_scale", "w_scale", "x_zp", "colsum", "bias")
W_LAYOUTS = ("kn", "nk")  # the weight (K, N), or (N, K) with K contiguous (see the module docstring)
_NT = (((1,), (1,)), ((), ()))  # dot_general of x (M, K) and w (N, K): contract both last axes
_ROW_OPERANDS = ("x_scale", "x_zp")  # (M, 1): indexed by the row block; the rest (1, N)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def check_operand(a: Any, name: str, dtype: Any, shape_doc: str, hint: str) -> jax.Array:
    """``a`` as a 2-D array of ``dtype``; a ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if not hasattr(a, "dtype") or not hasattr(a, "ndim"):
        raise TypeError(
            f"{name} must be a jax.Array of dtype {jnp.dtype(dtype).name}; got {type(a).__name__}"
        )
    if a.dtype != jnp.dtype(dtype):
        raise TypeError(f"{name} has dtype {a.dtype}, expected {jnp.dtype(dtype).name} {shape_doc}; {hint}")
    if a.ndim != 2:
        raise ValueError(
            f"{name} has shape {tuple(a.shape)} (rank {a.ndim}), expected rank 2 {shape_doc}; "
            f"flatten leading axes first, e.g. {name}.reshape(-1, {name}.shape[-1])"
        )
    return jnp.asarray(a)


def check_w_layout(w_layout: str) -> bool:
    """Whether the weight is ``(N, K)`` (``"nk"``); ``"kn"`` is ``(K, N)``; anything else is an error."""
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"w_layout={w_layout!r}: expected 'kn' (weight (K, N)) or 'nk' (weight (N, K))")
    return w_layout == "nk"


def check_contraction(x: jax.Array, w: jax.Array, x_name: str, w_name: str, w_layout: str = "kn") -> None:
    nk = check_w_layout(w_layout)
    k_w = w.shape[1] if nk else w.shape[0]
    if x.shape[1] != k_w:
        other = "kn" if nk else "nk"
        raise ValueError(
            f"{x_name} has K={x.shape[1]} columns but {w_name} has {k_w} {'columns' if nk else 'rows'} "
            f"(shapes {tuple(x.shape)} and {tuple(w.shape)}); with w_layout={w_layout!r} {w_name} must be "
            f"{'(N, K)' if nk else '(K, N)'}: transpose it, or pass w_layout={other!r} if it is stored "
            f"{'(K, N)' if nk else '(N, K)'}"
        )


def check_scale(s: Any, name: str, allowed: tuple[tuple[int, int], ...], what: str) -> jax.Array:
    """A float scale of one of the ``allowed`` shapes, as float32."""
    if not hasattr(s, "shape") or not jnp.issubdtype(jnp.result_type(s), jnp.floating):
        raise TypeError(
            f"{name} must be a float32 array {what}; got {type(s).__name__} {getattr(s, 'dtype', '')}"
        )
    if tuple(s.shape) not in allowed:
        raise ValueError(
            f"{name} has shape {tuple(s.shape)}; expected one of {list(allowed)} {what}; "
            f"reshape it, e.g. {name}.reshape{allowed[0]}"
        )
    return jnp.asarray(s).astype(jnp.float32)


def check_bias(bias: Any, n: int) -> jax.Array | None:
    if bias is None:
        return None
    if not hasattr(bias, "shape") or not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
        raise TypeError(
            f"bias must be a float array of shape ({n},); got {getattr(bias, 'dtype', type(bias))}"
        )
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected (N,) = ({n},), one per output column")
    return jnp.asarray(bias).astype(jnp.float32).reshape(1, n)


def check_out_dtype(out_dtype: Any) -> jnp.dtype:
    dt = jnp.dtype(out_dtype)
    if not jnp.issubdtype(dt, jnp.floating) or jnp.finfo(dt).bits < 16:
        raise ValueError(f"out_dtype={dt.name} must be float32, bfloat16 or float16")
    return dt


def check_blocks(kernel: str, backend: str, m: int, blocks: Any, operand_bits: int) -> kb.Blocks:
    """Blocks for this call, checked against what the backend can tile."""
    b = kb.choose_blocks(kernel, backend, m, blocks)
    if backend == "gpu":
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(b, name)
            if v < 16 or v & (v - 1):
                raise ValueError(
                    f"blocks.{name}={v}: Triton needs every dot dimension to be a power of two >= 16"
                )
    elif backend == "tpu":
        sub = 32 if operand_bits == 8 else 8
        if b.block_m % sub or b.block_n % 128 or b.block_k % 128:
            raise ValueError(
                f"blocks={b}: Mosaic tiles need block_m a multiple of {sub} and block_n, block_k "
                "multiples of 128"
            )
    return b


# ------------------------------------------------------------------------------------------------
# Kernel bodies
# ------------------------------------------------------------------------------------------------


def _dot(x: jax.Array, w: jax.Array, acc_dtype: Any, operand_dtype: Any | None, w_nk: bool) -> jax.Array:
    """``x (bm, bk) @ w`` with ``w`` ``(bk, bn)``, or ``(bn, bk)`` transposed if ``w_nk``."""
    if operand_dtype is not None:  # e.g. fp8 -> bf16 on TPU: exact, and the MXU takes bf16 everywhere
        x, w = x.astype(operand_dtype), w.astype(operand_dtype)
    if w_nk:
        return lax.dot_general(x, w, _NT, preferred_element_type=acc_dtype)
    return jnp.dot(x, w, preferred_element_type=acc_dtype)


def _epilogue(acc: jax.Array, epi: Mapping[str, jax.Array], out_dtype: Any) -> jax.Array:
    """acc (block_m, block_n) -> output tile; the same arithmetic, in the same order, as the references."""
    if "x_zp" in epi:
        acc = acc - epi["x_zp"] * epi["colsum"]  # int32: (bm, 1) * (1, bn)
    if "x_scale" not in epi:
        return acc.astype(out_dtype)
    y = acc.astype(jnp.float32) * epi["x_scale"] * epi["w_scale"]  # (bm, bn) * (bm, 1) * (1, bn)
    if "bias" in epi:
        y = y + epi["bias"]  # (1, bn)
    return y.astype(out_dtype)


def _gpu_kernel(
    x_ref: Any,
    w_ref: Any,
    *refs: Any,
    names: tuple[str, ...],
    steps: int,
    total_steps: int,
    bk: int,
    acc_dtype: Any,
    operand_dtype: Any,
    out_dtype: Any,
    w_nk: bool,
    rows: int,
) -> None:
    """One output tile over ``steps`` of the ``total_steps`` K steps of ``bk``, from step
    ``program_id(2) * steps``. ``x`` and the output have ``rows`` (M) rows, not padded to the block:
    the last M block loads zeros past them and stores only them. With K split (a grid of more than
    one K range) the tile is a raw partial sum, ``names`` is empty and XLA applies the epilogue."""
    # x_ref: (block_m, K); w_ref: (K, block_n), or (block_n, K) if w_nk; refs: epilogue operands,
    # then o_ref (block_m, block_n), or (1, block_m, block_n) when K is split
    *epi_refs, o_ref = refs
    bm, bn = o_ref.shape[-2:]
    x_mask = None if rows % bm == 0 else kb.row_mask((bm, bk), bm, rows)
    step_of = kb.k_range(steps, total_steps)

    def step(s: jax.Array, acc: jax.Array) -> jax.Array:
        t, keep = step_of(s)
        start = pl.multiple_of(t * bk, bk)
        x = kb.load_rows(x_ref.at[:, pl.ds(start, bk)], rows, bm, x_mask)  # (block_m, block_k)
        w = w_ref[:, pl.ds(start, bk)] if w_nk else w_ref[pl.ds(start, bk), :]
        d = _dot(x, w, acc_dtype, operand_dtype, w_nk)
        return acc + (d if keep is None else d * keep.astype(acc_dtype))

    acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), acc_dtype))  # (block_m, block_n)
    epi = {
        name: kb.load_rows(r, rows, bm) if name in _ROW_OPERANDS else r[...]
        for name, r in zip(names, epi_refs, strict=True)
    }
    kb.store_rows(o_ref, _epilogue(acc, epi, out_dtype).reshape(o_ref.shape), rows)


def _tpu_kernel(
    x_ref: Any,
    w_ref: Any,
    *refs: Any,
    names: tuple[str, ...],
    nk: int,
    acc_dtype: Any,
    operand_dtype: Any,
    out_dtype: Any,
    w_nk: bool,
) -> None:
    # x_ref: (block_m, block_k); w_ref: (block_k, block_n), or (block_n, block_k) if w_nk; refs:
    # epilogue operands, o_ref (block_m, block_n), then the VMEM accumulator acc_ref (block_m, block_n)
    *epi_refs, o_ref, acc_ref = refs
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    acc_ref[...] += _dot(x_ref[...], w_ref[...], acc_dtype, operand_dtype, w_nk)

    @pl.when(k == nk - 1)
    def _finish() -> None:
        epi = {n: r[...] for n, r in zip(names, epi_refs, strict=True)}
        o_ref[...] = _epilogue(acc_ref[...], epi, out_dtype)


# ------------------------------------------------------------------------------------------------
# The shared driver
# ------------------------------------------------------------------------------------------------


def gpu_weight_spec(kp: int, bn: int, w_nk: bool) -> Any:
    """The weight's block at grid point ``(i, j, ...)`` of the GPU bodies: all of K for column block
    ``j`` (a K range, if the grid has one, picks its steps inside the block)."""
    if w_nk:
        return pl.BlockSpec((bn, kp), lambda i, j, *_: (j, 0))
    return pl.BlockSpec((kp, bn), lambda i, j, *_: (0, j))


def tpu_weight_spec(bk: int, bn: int, w_nk: bool) -> Any:
    """The weight's block at grid point ``(i, j, k)`` of the TPU bodies: K block ``k``, columns ``j``."""
    if w_nk:
        return pl.BlockSpec((bn, bk), lambda i, j, k: (j, k))
    return pl.BlockSpec((bk, bn), lambda i, j, k: (k, j))


def _scaled_matmul(
    x: jax.Array,
    w: jax.Array,
    epilogue: Mapping[str, jax.Array],
    *,
    kernel: str,
    acc_dtype: Any,
    out_dtype: Any,
    blocks: Any,
    backend: str | None,
    tpu_operand_dtype: Any = None,
    body: str | None = None,
    w_layout: str = "kn",
    split_k: int | None = None,
) -> jax.Array:
    """Pad, launch the Pallas kernel and slice back. ``epilogue``: checked operands keyed by
    ``_EPILOGUE_ORDER`` names, row operands (M, 1), column operands (1, N); empty for the raw
    accumulator. ``body`` ("gpu"/"tpu") overrides which body the interpreter runs. ``w`` is
    ``(K, N)``, or ``(N, K)`` if ``w_layout == "nk"``. ``split_k``: K ranges of the GPU body
    (:func:`qjax.kernels.blocks.split_k_ranges`; ``None``: enough to fill the GPU on ``"gpu"``, one
    on the interpreter)."""
    be = kb.resolve_backend(backend)
    w_nk = check_w_layout(w_layout)
    m, n = x.shape[0], w.shape[0 if w_nk else 1]
    if be == "mosaic_gpu" and split_k not in (None, 1):
        raise ValueError(f"split_k={split_k}: the mosaic_gpu backend does not split K; use backend='gpu'")
    if be == "mosaic_gpu":
        from qjax.kernels import hopper

        return hopper.scaled_matmul_hopper(
            x,
            # (N, K) padded to the tiles: a transpose per call for "kn"; prepare once to avoid it
            hopper.prepare_weight(w, w_layout=w_layout),
            epilogue,
            n=n,
            acc_dtype=acc_dtype,
            out_dtype=out_dtype,
            config=blocks,
        )
    bl = check_blocks(kernel, be, m, blocks, jnp.dtype(x.dtype).itemsize * 8)
    body = body or ("tpu" if be == "tpu" else "gpu")
    if body not in ("gpu", "tpu"):
        raise ValueError(f"body={body!r}: expected 'gpu' or 'tpu'")
    bm, bn, bk = bl.block_m, bl.block_n, bl.block_k
    n_block, k_block = (bn, bk) if w_nk else (bk, bn)  # the blocks of w's axes 0 and 1
    wp = kb.pad_axis(kb.pad_axis(w, 0, n_block), 1, k_block)  # (Np, Kp) or (Kp, Np)
    kp = wp.shape[1 if w_nk else 0]
    np_ = wp.shape[0 if w_nk else 1]
    mp = kb.round_up(m, bm)
    nk = kp // bk
    full = {  # the epilogue operands at full extent: row operands (M, 1), column operands (1, N)
        name: jnp.broadcast_to(a, (m, 1) if name in _ROW_OPERANDS else (1, n)) for name, a in epilogue.items()
    }
    if body == "gpu":
        # K ranges: one unless the (M, N) grid is too small to fill the GPU (split_k=None) or asked
        split, per = kb.split_k_ranges(
            (mp // bm) * (np_ // bn), nk, 1 if split_k is None and be != "gpu" else split_k
        )
    elif split_k not in (None, 1):
        raise ValueError(f"split_k={split_k}: K is split on GPU (Triton) only; the TPU body takes none")
    else:
        split, per = 1, nk
    fused = split == 1  # the epilogue in the kernel; with K split, after XLA's sum of the partials
    names = tuple(name for name in _EPILOGUE_ORDER if name in epilogue) if fused else ()
    operand_dtype = tpu_operand_dtype if body == "tpu" else None
    if body == "gpu":  # x not padded to the M block (masked rows)
        xp = kb.pad_axis(x, 1, bk)  # (M, Kp)
        pad = lambda name: full[name] if name in _ROW_OPERANDS else kb.pad_axis(full[name], 1, bn)
        operands = [pad(name) for name in names]  # row operands not padded (masked loads)
        grid: tuple[int, ...] = (mp // bm, np_ // bn, split)
        in_specs = [pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0)), gpu_weight_spec(kp, bn, w_nk)]
        row_spec = pl.BlockSpec((bm, 1), lambda i, j, s: (i, 0))
        col_spec = pl.BlockSpec((1, bn), lambda i, j, s: (0, j))
        if fused:
            out_shape = jax.ShapeDtypeStruct((m, np_), out_dtype)
            out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
        else:
            out_shape = jax.ShapeDtypeStruct((split, m, np_), acc_dtype)
            out_spec = pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j))
        fn = functools.partial(
            _gpu_kernel,
            names=names,
            steps=per,
            total_steps=nk,
            bk=bk,
            acc_dtype=acc_dtype,
            operand_dtype=operand_dtype,
            out_dtype=out_dtype if fused else acc_dtype,
            w_nk=w_nk,
            rows=m,
        )
        scratch: list[Any] = []
        semantics: tuple[str, ...] = ("parallel", "parallel", "arbitrary")
    else:
        xp = kb.pad_axis(kb.pad_axis(x, 0, bm), 1, bk)  # (Mp, Kp)
        operands = [
            kb.pad_axis(full[name], 0 if name in _ROW_OPERANDS else 1, bm if name in _ROW_OPERANDS else bn)
            for name in names
        ]
        out_shape = jax.ShapeDtypeStruct((mp, np_), out_dtype)
        grid = (mp // bm, np_ // bn, nk)
        in_specs = [
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            tpu_weight_spec(bk, bn, w_nk),
        ]
        row_spec = pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0))
        col_spec = pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))
        fn = functools.partial(
            _tpu_kernel,
            names=names,
            nk=nk,
            acc_dtype=acc_dtype,
            operand_dtype=operand_dtype,
            out_dtype=out_dtype,
            w_nk=w_nk,
        )
        from jax.experimental.pallas import tpu as pltpu

        scratch = [pltpu.VMEM((bm, bn), acc_dtype)]
        semantics = ("parallel", "parallel", "arbitrary")
    in_specs += [row_spec if name in _ROW_OPERANDS else col_spec for name in names]
    out = pl.pallas_call(
        fn,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        scratch_shapes=scratch,
        compiler_params=kb.compiler_params(be, bl, semantics),
        interpret=be == "interpret",
        name=f"qjax_{kernel}",
    )(xp, wp, *operands)
    if fused:
        return out[:m, :n]
    # the real rows and columns of the partial sums only (the kernel wrote no others), then the
    # epilogue: exact for int32 partial sums, as in the kernel
    return _epilogue(out[:, :, :n].sum(axis=0), full, out_dtype)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------

_X_DOC = "of shape (M, K)"
_W_DOCS = {"kn": "of shape (K, N)", "nk": "of shape (N, K) (w_layout='nk')"}


def _as_kn(w: jax.Array, w_layout: str) -> jax.Array:
    """The weight ``(K, N)`` whatever its layout (the references compute in one layout)."""
    return w.T if check_w_layout(w_layout) else w


def check_scaled_operands(
    x_q: Any,
    x_scale: Any,
    w_q: Any,
    w_scale: Any,
    bias: Any,
    out_dtype: Any,
    *,
    dtype: Any,
    x_hint: str,
    w_hint: str,
    w_scale_doc: str,
    w_layout: str = "kn",
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jnp.dtype]:
    """The operands of a scaled matmul (W8A8, FP8) checked: ``x_q`` ``(M, K)`` and ``w_q``
    ``(K, N)`` (``(N, K)`` if ``w_layout == "nk"``) of ``dtype``, ``x_scale`` per token or per
    tensor, ``w_scale`` per column or per tensor, ``bias`` ``(N,)`` or None; returns them with the
    epilogue operands and the out dtype."""
    nk = check_w_layout(w_layout)
    x_q = check_operand(x_q, "x_q", dtype, _X_DOC, x_hint)
    w_q = check_operand(w_q, "w_q", dtype, _W_DOCS[w_layout], w_hint)
    check_contraction(x_q, w_q, "x_q", "w_q", w_layout)
    m, n = x_q.shape[0], w_q.shape[0 if nk else 1]
    epi = {
        "x_scale": check_scale(x_scale, "x_scale", ((m, 1), (1, 1)), "(M, 1) per token or (1, 1) per tensor"),
        "w_scale": check_scale(w_scale, "w_scale", ((1, n), (1, 1)), w_scale_doc),
    }
    b = check_bias(bias, n)
    if b is not None:
        epi["bias"] = b
    return x_q, w_q, epi, check_out_dtype(out_dtype)


def _check_w8a8(
    x_q: Any,
    x_scale: Any,
    w_q: Any,
    w_scale: Any,
    x_zero_point: Any,
    bias: Any,
    out_dtype: Any,
    w_layout: str = "kn",
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jnp.dtype]:
    x_q, w_q, epi, dt = check_scaled_operands(
        x_q,
        x_scale,
        w_q,
        w_scale,
        bias,
        out_dtype,
        dtype=jnp.int8,
        x_hint="quantize activations first, e.g. quantize_per_token(x)",
        w_hint="quantize weights to symmetric int8 per output channel",
        w_scale_doc="(1, N) per output channel",
        w_layout=w_layout,
    )
    if x_zero_point is not None:
        zp_shape = tuple(epi["x_scale"].shape)
        if not hasattr(x_zero_point, "shape") or not jnp.issubdtype(x_zero_point.dtype, jnp.integer):
            raise TypeError(
                f"x_zero_point must be an int32 array of shape {zp_shape} (x_scale's); got "
                f"{getattr(x_zero_point, 'dtype', type(x_zero_point).__name__)}"
            )
        if tuple(x_zero_point.shape) != zp_shape:
            raise ValueError(
                f"x_zero_point has shape {tuple(x_zero_point.shape)} but x_scale has {zp_shape}; "
                "give one zero point per scale"
            )
        epi["x_zp"] = jnp.asarray(x_zero_point).astype(jnp.int32)
        k_axis = 1 if w_layout == "nk" else 0
        epi["colsum"] = jnp.sum(w_q.astype(jnp.int32), axis=k_axis).reshape(1, -1)  # (1, N)
    return x_q, w_q, epi, dt


def w8a8_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    x_zero_point: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
    blocks: kb.Blocks | Mapping[str, Any] | Any | None = None,
    backend: str | None = None,
    w_layout: str = "kn",
    split_k: int | None = None,
) -> jax.Array:
    """Int8 x int8 matmul with int32 accumulation and a fused float32 epilogue.

    .. math::

        y_{mn} = s^x_m s^w_n \\Big(\\sum_k q^x_{mk} q^w_{kn} - z^x_m \\sum_k q^w_{kn}\\Big) + b_n

    Args:
      x_q: int8 ``(M, K)`` activations.
      x_scale: float32 ``(M, 1)`` (per token) or ``(1, 1)`` (per tensor).
      w_q: int8 ``(K, N)`` weights (``(N, K)`` with ``w_layout="nk"``), symmetric per output channel.
      w_scale: float32 ``(1, N)`` (or ``(1, 1)``).
      x_zero_point: int32 of ``x_scale``'s shape (asymmetric activations) or ``None``; the
        correction uses the column sums of ``w_q``, computed once per call outside the kernel.
      bias: float ``(N,)`` or ``None``.
      out_dtype: float32, bfloat16 or float16.
      blocks: overrides of the block table (:func:`qjax.kernels.blocks.choose_blocks`).
      backend: ``"gpu"``, ``"tpu"``, ``"interpret"``, ``"mosaic_gpu"`` (the Hopper path,
        :mod:`qjax.kernels.hopper`; ``blocks`` then a :class:`~qjax.kernels.hopper.HopperConfig`
        or a mapping of its fields) or ``None`` (the default device's).
      w_layout: ``"kn"`` (``w_q`` is ``(K, N)``) or ``"nk"`` (``(N, K)``, K contiguous: the operand
        Hopper's 8-bit tensor cores read; see the module docstring).
      split_k: K ranges run by separate programs of the GPU body (Triton, interpreter), their int32
        partial sums added and the epilogue applied by XLA (exact: the same result). ``None``: on
        ``"gpu"`` enough ranges to fill the GPU when the (M, N) grid is small (decode), else one.

    Returns:
      ``(M, N)`` of ``out_dtype``.
    """
    x_q, w_q, epi, dt = _check_w8a8(x_q, x_scale, w_q, w_scale, x_zero_point, bias, out_dtype, w_layout)
    kw: dict[str, Any] = dict(blocks=blocks, backend=backend, w_layout=w_layout, split_k=split_k)
    return _scaled_matmul(x_q, w_q, epi, kernel="w8a8", acc_dtype=jnp.int32, out_dtype=dt, **kw)


def w8a8_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    x_zero_point: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
    w_layout: str = "kn",
) -> jax.Array:
    """:func:`w8a8_matmul` in plain ``jax.numpy`` (XLA's int32 dot, the same float32 epilogue)."""
    x_q, w_q, epi, dt = _check_w8a8(x_q, x_scale, w_q, w_scale, x_zero_point, bias, out_dtype, w_layout)
    acc = int8_matmul_reference(x_q, _as_kn(w_q, w_layout))
    return _epilogue(acc, epi, dt)


def int8_matmul(
    x_q: jax.Array,
    w_q: jax.Array,
    *,
    blocks: kb.Blocks | Mapping[str, Any] | Any | None = None,
    backend: str | None = None,
    w_layout: str = "kn",
    split_k: int | None = None,
) -> jax.Array:
    """The raw int32 accumulator :math:`\\sum_k q^x_{mk} q^w_{kn}` of int8 ``(M, K)`` and ``(K, N)``
    (``(N, K)`` with ``w_layout="nk"``): the :func:`w8a8_matmul` kernel without its epilogue."""
    x_q, w_q = _check_int8(x_q, w_q, w_layout)
    kw: dict[str, Any] = dict(blocks=blocks, backend=backend, w_layout=w_layout, split_k=split_k)
    return _scaled_matmul(x_q, w_q, {}, kernel="w8a8", acc_dtype=jnp.int32, out_dtype=jnp.int32, **kw)


def _check_int8(x_q: Any, w_q: Any, w_layout: str) -> tuple[jax.Array, jax.Array]:
    check_w_layout(w_layout)
    hint = "convert with {}.astype(jnp.int8) if in range"
    x_q = check_operand(x_q, "x_q", jnp.int8, _X_DOC, hint.format("x_q"))
    w_q = check_operand(w_q, "w_q", jnp.int8, _W_DOCS[w_layout], hint.format("w_q"))
    check_contraction(x_q, w_q, "x_q", "w_q", w_layout)
    return x_q, w_q


def int8_matmul_reference(x_q: jax.Array, w_q: jax.Array, *, w_layout: str = "kn") -> jax.Array:
    """``x_q @ w_q`` (``x_q @ w_q.T`` with ``w_layout="nk"``) in int32 by XLA (exact)."""
    x_q, w_q = _check_int8(x_q, w_q, w_layout)
    w_q = _as_kn(w_q, w_layout)
    return lax.dot_general(x_q, w_q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
