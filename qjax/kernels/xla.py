"""Real low-precision contractions with XLA: integer (int32-accumulated) and fp8 (f32-accumulated)
dot_general and convolution on stored ``QArray`` operands, and weight-only dequantize-then-compute.

With :math:`\\hat x = S_x (q_x - Z_x)` and :math:`\\hat w = S_w (q_w - Z_w)`, a contraction over
:math:`k` expands as in the design notes:

.. math::

    \\sum_k \\hat x_k \\hat w_k = S_x S_w \\Big[\\sum_k q_x q_w - Z_x \\sum_k q_w - Z_w \\sum_k q_x
        + K Z_x Z_w\\Big],

where the integer dot runs in int8 x int8 with int32 accumulation and the correction sums are
themselves contractions (of the operand with ones). Symmetric operands (``Z = 0``) drop their terms.
Unsigned values are shifted into int8 by :math:`-128`, which the zero point absorbs
(:math:`q - Z = (q - 128) - (Z - 128)`).

Scales broadcast to the output by the same contraction applied to the grids of quantization
parameters, which have extent 1 on the contracted axes; block-wise grids (a weight in 128 x 128
blocks) are first repeated to full extent on the free axes. A weight grouped along the (single)
contracted axis becomes a batch axis of group partial sums, scaled and then summed. This module is
the CPU path and the ``*_reference`` the Pallas kernels are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax.numerics import QArray, dequantize
from qjax.numerics.formats import BlockFloatFormat, IntFormat

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


class Operand(NamedTuple):
    """One side of a low-precision contraction: ``real = scale * (values - zero_point)``.

    ``values`` are int8 (or fp8); ``zero_point`` (int32) and ``scale`` (float32) are grids with
    the operand's rank, broadcast block-wise; ``zero_point`` is ``None`` when it is 0.
    """

    values: jax.Array
    zero_point: jax.Array | None
    scale: jax.Array


def int8_operand(values: jax.Array, zero_point: jax.Array | None, scale: jax.Array, signed: bool) -> Operand:
    """An integer operand in int8; unsigned values are shifted by -128 into the zero point."""
    z = None if zero_point is None else zero_point.astype(jnp.int32)
    if not signed:
        values = values.astype(jnp.int16) - 128
        z = (jnp.zeros((), jnp.int32) if z is None else z) - 128
    return Operand(values.astype(jnp.int8), z, scale.astype(jnp.float32))


def operand(q: QArray) -> Operand:
    """The contraction operand of a stored integer or fp8 ``QArray``."""
    fmt = q.spec.format
    if isinstance(fmt, IntFormat):
        return int8_operand(q.values, q.zero_point, q.qparams.scale, fmt.signed)
    return Operand(q.values, None, q.qparams.scale.astype(jnp.float32))


def _grid(p: jax.Array, operand_shape: tuple[int, ...], batch_axes: Sequence[int]) -> jax.Array:
    """A parameter grid with its batch axes broadcast to the operand's (dot_general needs equal)."""
    if p.ndim == 0:
        p = p.reshape((1,) * len(operand_shape))
    shape = tuple(operand_shape[a] if a in batch_axes else n for a, n in enumerate(p.shape))
    return jnp.broadcast_to(p, shape)


def _ones(operand_shape: tuple[int, ...], keep: Sequence[int], dtype: jnp.dtype) -> jax.Array:
    """Ones with the operand's extent on ``keep`` axes and 1 elsewhere."""
    return jnp.ones(tuple(n if a in keep else 1 for a, n in enumerate(operand_shape)), dtype)


def to_output(
    grid: jax.Array, side: str, lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...], dn: DimensionNumbers
) -> jax.Array:
    """An operand's parameter grid (extent 1 on contracted axes) laid out like the output.

    A contraction with ones of extent 1 on every axis but the batch axes moves the grid's free axes
    to where ``dot_general`` puts them: (batch, lhs free, rhs free).
    """
    (_, _), (lb, rb) = dn
    if side == "lhs":
        return jax.lax.dot_general(_grid(grid, lhs_shape, lb), _ones(rhs_shape, rb, grid.dtype), dn)
    return jax.lax.dot_general(_ones(lhs_shape, lb, grid.dtype), _grid(grid, rhs_shape, rb), dn)


def _split_groups(x: jax.Array, g: jax.Array, axis: int, groups: int) -> tuple[jax.Array, jax.Array]:
    """Split contracted ``axis`` into (groups, K/groups) and move the group axis to the front."""
    shape = (*x.shape[:axis], groups, x.shape[axis] // groups, *x.shape[axis + 1 :])
    x = jnp.moveaxis(x.reshape(shape), axis, 0)
    gshape = (*g.shape[:axis], g.shape[axis], 1, *g.shape[axis + 1 :])
    g = jnp.moveaxis(g.reshape(gshape), axis, 0)
    return x, jnp.broadcast_to(g, (groups, *g.shape[1:]))


def _contracted_groups(lhs: Operand, rhs: Operand, lc: Sequence[int], rc: Sequence[int]) -> int:
    """Number of scale groups along the contraction (1 when both grids are constant along it)."""
    groups = 1
    for name, op, axes in (("activations", lhs, lc), ("weights", rhs, rc)):
        scale = op.scale if op.scale.ndim else None
        extents = [1 if scale is None else scale.shape[a] for a in axes]
        g = max(extents, default=1)
        if g > 1 and len(axes) != 1:
            raise ValueError(
                f"the {name} have {g} scale groups along a contraction over several axes {tuple(axes)}; "
                "the integer path groups along one contracted axis only: use per-channel scales or "
                "weight-only quantization"
            )
        if g > 1 and groups > 1 and g != groups:
            raise ValueError(
                f"activation and weight scale groups along the contraction differ ({groups} vs {g}); "
                "use the same group size for both"
            )
        groups = max(groups, g)
    return groups


def _scaled_dot(
    xl: jax.Array,
    zl: jax.Array | None,
    sl: jax.Array,
    xr: jax.Array,
    zr: jax.Array | None,
    sr: jax.Array,
    dn: DimensionNumbers,
    accumulate: jnp.dtype,
) -> jax.Array:
    """``S_l S_r [x_l x_r - Z_l sum x_r - Z_r sum x_l + K Z_l Z_r]`` with every term a contraction."""
    (lc, rc), (lb, rb) = dn
    acc = jax.lax.dot_general(xl, xr, dn, preferred_element_type=accumulate)
    if zl is not None:
        zl_out = to_output(zl, "lhs", xl.shape, xr.shape, dn)
        colsum_r = jax.lax.dot_general(
            _ones(xl.shape, (*lb, *lc), xl.dtype), xr, dn, preferred_element_type=jnp.int32
        )
        acc = acc - zl_out * colsum_r
    if zr is not None:
        zr_out = to_output(zr, "rhs", xl.shape, xr.shape, dn)
        rowsum_l = jax.lax.dot_general(
            xl, _ones(xr.shape, (*rb, *rc), xr.dtype), dn, preferred_element_type=jnp.int32
        )
        acc = acc - zr_out * rowsum_l
        if zl is not None:
            k = math.prod(xl.shape[a] for a in lc)
            acc = acc + k * zl_out * zr_out
    scale = jax.lax.dot_general(_grid(sl, xl.shape, lb), _grid(sr, xr.shape, rb), dn)
    return acc.astype(jnp.float32) * scale


def quantized_dot_general(
    lhs: jax.Array | QArray,
    rhs: QArray,
    dimension_numbers: DimensionNumbers,
    *,
    out_dtype: jnp.dtype | type = jnp.float32,
) -> jax.Array:
    """``lax.dot_general(lhs, rhs)`` with a stored weight ``rhs``.

    * float ``lhs``: weight-only; ``rhs`` is dequantized and the product runs in ``lhs``'s dtype.
    * integer ``lhs`` and ``rhs``: int8 x int8 -> int32 with zero-point corrections, then scales.
    * fp8 ``lhs`` and ``rhs``: fp8 x fp8 -> f32, then scales.
    """
    if not isinstance(lhs, QArray):
        w = dequantize(rhs, jnp.result_type(lhs))
        return jax.lax.dot_general(lhs, w, dimension_numbers).astype(out_dtype)
    fl, fr = lhs.spec.format, rhs.spec.format
    kinds = {type(fl).__name__, type(fr).__name__}
    if kinds not in ({"IntFormat"}, {"FloatFormat"}):
        raise ValueError(
            f"no low-precision contraction of {lhs.spec.dtype} activations with {rhs.spec.dtype} "
            "weights; use integer x integer or fp8 x fp8, or weight-only quantization"
        )
    if isinstance(fl, BlockFloatFormat) or isinstance(fr, BlockFloatFormat):
        raise ValueError("MX/NVFP4 operands run weight-only here; drop the activation spec")
    return contract(operand(lhs), operand(rhs), dimension_numbers).astype(out_dtype)


def _expand_free(grid: jax.Array, shape: tuple[int, ...], contracted: Sequence[int]) -> jax.Array:
    """A block-wise grid repeated to the operand's extent on its free and batch axes (a weight in
    128 x 128 blocks has one scale per 128 output columns); contracted axes keep their groups."""
    if grid.ndim == 0:
        return grid
    for axis, (g, n) in enumerate(zip(grid.shape, shape, strict=True)):
        if axis not in contracted and g not in (1, n):
            grid = jnp.repeat(grid, n // g, axis=axis)
    return grid


def contract(lhs: Operand, rhs: Operand, dimension_numbers: DimensionNumbers) -> jax.Array:
    """The float32 contraction of two low-precision operands (int8 -> int32, or fp8 -> f32)."""
    (lc, rc), (lb, rb) = dimension_numbers
    xl, xr = lhs.values, rhs.values
    sl, sr = _expand_free(lhs.scale, xl.shape, lc), _expand_free(rhs.scale, xr.shape, rc)
    zl = None if lhs.zero_point is None else _expand_free(lhs.zero_point, xl.shape, lc)
    zr = None if rhs.zero_point is None else _expand_free(rhs.zero_point, xr.shape, rc)
    lhs, rhs = Operand(xl, zl, sl), Operand(xr, zr, sr)
    accumulate = jnp.int32 if jnp.issubdtype(xl.dtype, jnp.integer) else jnp.float32
    groups = _contracted_groups(lhs, rhs, lc, rc)
    if groups == 1:
        return _scaled_dot(xl, zl, sl, xr, zr, sr, dimension_numbers, accumulate)
    # Group partial sums: the group index becomes the leading batch axis of both operands.
    (a,), (b,) = lc, rc

    def split(x, z, s, axis):  # type: ignore[no-untyped-def]
        s_full = _grid(s, x.shape, ())
        xs, ss = _split_groups(x, s_full, axis, groups)
        zs = None if z is None else _split_groups(x, _grid(z, x.shape, ()), axis, groups)[1]
        return xs, zs, ss

    xl, zl, sl = split(xl, zl, sl, a)
    xr, zr, sr = split(xr, zr, sr, b)
    shift = lambda axes: tuple(i + 1 if i >= 0 else i for i in axes)
    dn = (((a + 1,), (b + 1,)), ((0, *shift(lb)), (0, *shift(rb))))
    return jnp.sum(_scaled_dot(xl, zl, sl, xr, zr, sr, dn, accumulate), axis=0)


def quantized_conv(
    lhs: jax.Array | QArray,
    rhs: QArray,
    *,
    out_dtype: jnp.dtype | type = jnp.float32,
    **conv_kwargs: object,
) -> jax.Array:
    """``lax.conv_general_dilated(lhs, rhs, **conv_kwargs)`` with a stored kernel ``rhs``.

    Integer activations and kernels convolve in int8 with int32 accumulation. The activation zero
    point is corrected by a convolution of ones (exact at padded borders, where ``q_x = 0`` but the
    real value is 0 only if ``Z_x = 0``); the activation scale must be per-tensor and the kernel's
    per output channel (or per-tensor).
    """
    conv = lambda x, w, t=None: jax.lax.conv_general_dilated(
        x,
        w,
        preferred_element_type=t,
        **conv_kwargs,  # type: ignore[arg-type]
    )
    if not isinstance(lhs, QArray):
        return conv(lhs, dequantize(rhs, jnp.result_type(lhs))).astype(out_dtype)
    if not (isinstance(lhs.spec.format, IntFormat) and isinstance(rhs.spec.format, IntFormat)):
        raise ValueError(
            f"integer convolution needs integer activations and kernel; got {lhs.spec.dtype} and "
            f"{rhs.spec.dtype}: use weight-only quantization for other formats"
        )
    for name, q, free in (("activation", lhs, ()), ("kernel", rhs, (rhs.data.ndim - 1,))):
        s = q.scale
        if s is not None and any(n > 1 for a, n in enumerate(s.shape) if a not in free):
            raise ValueError(
                f"the {name} scale grid {tuple(s.shape)} varies along axes a convolution mixes; "
                f"use per-tensor activations and per-output-channel (axis=-1) kernel scales"
            )
    xl, zl, sl = operand(lhs)
    xr, zr, sr = operand(rhs)
    acc = conv(xl, xr, jnp.int32)
    channels = (1,) * (acc.ndim - 1) + (-1,)  # per-output-channel parameters, broadcast over NHW
    if zl is not None:
        acc = acc - zl.reshape(()) * conv(jnp.ones_like(xl), xr, jnp.int32)
    if zr is not None:
        zr_c = zr.reshape(channels)
        acc = acc - zr_c * conv(xl, jnp.ones_like(xr), jnp.int32)
        if zl is not None:
            acc = acc + zl.reshape(()) * zr_c * conv(jnp.ones_like(xl), jnp.ones_like(xr), jnp.int32)
    return (acc.astype(jnp.float32) * (sl.reshape(()) * sr.reshape(channels))).astype(out_dtype)
