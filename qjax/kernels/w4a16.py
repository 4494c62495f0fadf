"""W4A16 weight-only matmul: 16/32-bit activations times int4 weights, dequantized inside a Pallas kernel.

The weight is int4 codes :math:`q` with a scale :math:`s` (and optionally a zero point :math:`z`)
per group of ``group_size`` (:math:`g`) consecutive rows along the contraction axis :math:`K`:

.. math::

    w_{kn} = (q_{kn} - z_{\\lfloor k/g \\rfloor n})\\, s_{\\lfloor k/g \\rfloor n}, \\qquad
    y_{mn} = \\sum_k x_{mk} w_{kn} + b_n
           = \\sum_j s_{jn} \\sum_{k \\in \\text{group } j} x_{mk} (q_{kn} - z_{jn}) + b_n,

with :math:`q \\in [-8, 7]` (signed, :math:`z = 0`) or :math:`q \\in [0, 15]` (asymmetric, AWQ/GPTQ
style uint4). :func:`pack_w4` stores two codes per byte (:class:`PackedW4`) so that a kernel reads a
quarter of the bytes of a bf16 weight; at small M (decode) the matmul is memory bound and that is
where the kernel wins.

**Packing layout.** :math:`K` is padded to ``K_pad`` (a multiple of ``max(128, g)``) and :math:`N`
to ``N_pad`` (a multiple of 128). Group :math:`j` (rows :math:`jg \\ldots jg + g - 1`) occupies the
packed rows :math:`j g/2 \\ldots j g/2 + g/2 - 1`; packed row :math:`j g/2 + r` holds in its low
nibble the code of row :math:`jg + r` and in its high nibble the code of row :math:`jg + g/2 + r`
(:math:`0 \\le r < g/2`). Signed codes are stored excess-8 (nibble :math:`q + 8`), unsigned ones as
they are, so a nibble :math:`n` always decodes as :math:`n - z` (:math:`z = 8` when symmetric). So
one group is one contiguous ``(g/2, N)`` byte tile, and its two halves multiply the contiguous
activation slices ``x[:, jg : jg+g/2]`` and ``x[:, jg+g/2 : jg+g]``: no strided loads, no
in-register interleave.

**GPU (Triton).** Grid (M blocks, N blocks, K splits); each program keeps an f32 ``(block_m,
block_n)`` accumulator and runs a ``fori_loop`` over its K range, ``block_k / g`` groups per step.
Per group it loads the ``(g/2, block_n)`` byte tile and unpacks it in registers straight into the
activation dtype with the float-bits trick (:func:`_unpack_group_magic`: ``bits(2**7) | n`` read as
bf16 is ``128 + n``; subtract ``128 + z``), which measured 1.2-1.5x faster on an H100 than
int -> f32 -> bf16 converts for symmetric weights (about even for asymmetric ones); ``q - z`` is
exact (integer zero points), and
``acc += (dot(x_lo, lo) + dot(x_hi, hi)) * s_j`` with f32 accumulation applies the group scale in
f32 after the dot, so no weight is rounded to bf16. Triton dots need every dimension >= 16, so
``M`` is tiled by ``block_m >= 16`` and ``g >= 32``; ``x`` is not padded: the rows of the last M
block past M load as zeros (masked loads) and are not stored (masked stores), so M = 1 decode
reads one row of ``x`` and writes one row of output. When the (M, N) grid
is too small to fill the GPU (decode with a narrow N or a long K) K is split over programs that write
f32 partial sums, added up by XLA (``split_k``; ``None`` picks it). ``swap_ab=True`` computes each
tile transposed, ``(w^T x^T)^T``, so the dequantized weight is the left operand of the dot (on
Hopper the operand ``wgmma`` can take from registers) and the padded M its narrow side; an option to
time (``experiments.kernels.profile_w4a16``), not the default.

**TPU (Mosaic).** Grid (M/bm, N/bn, K/bk) with K ``"arbitrary"`` and a VMEM f32 accumulator
initialised and written out under ``pl.when``. The ``(bk/2, bn)`` byte tile is widened to int32,
unpacked per group into ``(q - z) * s`` in f32, concatenated to a ``(bk, bn)`` tile, cast to the
activation dtype (this rounds the dequantized weight for bf16/f16 activations) and fed to one dot.

**Interpret** (CPU, tests) runs the GPU kernel body with ``interpret=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qjax.kernels.blocks import (
    Blocks,
    choose_blocks,
    compiler_params,
    k_range,
    load_rows,
    pad_axis,
    resolve_backend,
    round_up,
    row_mask,
    split_k_ranges,
    store_rows,
)

__all__ = ["PackedW4", "pack_w4", "unpack_w4", "w4a16_matmul", "w4a16_matmul_reference"]

ACT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
N_ALIGN = 128
K_ALIGN = 128
UNPACKS = ("magic", "asm", "convert")  # how the GPU kernel unpacks nibbles; see _gpu_kernel


class PackedW4(NamedTuple):
    """An int4 weight packed for :func:`w4a16_matmul` (a pytree: ``k, n, group_size`` are static).

    Invariant: ``packed`` is uint8 ``(K_pad // 2, N_pad)`` in the layout of the module docstring,
    ``scales`` float32 ``(K_pad // group_size, N_pad)``, ``zeros`` float32 of the same shape or
    ``None`` (symmetric: codes in ``[-8, 7]``, stored excess-8; otherwise unsigned ``[0, 15]`` with
    integer-valued zero points in ``[0, 15]``, which the GPU kernel's unpack needs to be exact);
    ``K_pad = round_up(k, max(128, group_size))``, ``N_pad = round_up(n, 128)``; padded rows and
    columns have code 0, scale 0 and zero point 0, so they dequantize to exactly 0. ``k, n`` are the
    logical weight shape.
    """

    packed: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    k: int
    n: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None


jax.tree_util.register_pytree_node(
    PackedW4,
    lambda w: ((w.packed, w.scales, w.zeros), (w.k, w.n, w.group_size)),
    lambda aux, children: PackedW4(*children, *aux),
)


def _concrete(a: Any) -> np.ndarray | None:
    """``a`` as numpy, or None under a trace (values cannot be checked under jit)."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def pack_w4(q: jax.Array, scales: jax.Array, zeros: jax.Array | None = None, *, group_size: int) -> PackedW4:
    """Pack integer codes ``q`` (K, N) with group-wise ``scales`` (and ``zeros``) into a :class:`PackedW4`.

    ``q`` holds signed int4 codes in ``[-8, 7]`` when ``zeros`` is None, else unsigned ``[0, 15]``;
    ``scales``/``zeros`` are ``(K // group_size, N)``; the weight is ``(q - z) * s`` group-wise.
    Shapes and dtypes are validated always; the code range and integer zero points in ``[0, 15]`` only
    when the arrays are concrete (under ``jax.jit`` they cannot be checked: out-of-range codes are
    silently truncated to 4 bits, and the GPU kernel rounds a fractional zero point to the nearest
    integer when it unpacks).
    """
    if not isinstance(group_size, int) or group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size!r}: expected a power of two >= 32 (e.g. 32, 64, 128)")
    q, scales = jnp.asarray(q), jnp.asarray(scales)
    if q.ndim != 2 or not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"q: expected a 2-D integer (K, N) array of codes, got {q.dtype}{list(q.shape)}")
    k, n = q.shape
    if k % 2:
        raise ValueError(f"q: K={k} is odd; two codes are packed per byte along K, pad K to an even size")
    if k % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide K={k}; pad K to a multiple of {group_size} "
            "(padded rows with code 0 and scale 0) or choose a group size that divides it"
        )
    groups = k // group_size
    for name, a in (("scales", scales), ("zeros", zeros)):
        if a is None:
            continue
        a = jnp.asarray(a)
        if a.shape != (groups, n):
            raise ValueError(f"{name}: expected shape (K // group_size, N) = {(groups, n)}, got {a.shape}")
        if not (
            jnp.issubdtype(a.dtype, jnp.floating)
            or (name == "zeros" and jnp.issubdtype(a.dtype, jnp.integer))
        ):
            raise ValueError(
                f"{name}: expected a float{' or integer' if name == 'zeros' else ''} array, got {a.dtype}"
            )
    lo_code, hi_code = (-8, 7) if zeros is None else (0, 15)
    values = _concrete(q)
    if values is not None and values.size and (values.min() < lo_code or values.max() > hi_code):
        kind = "signed (zeros=None)" if zeros is None else "unsigned (with zeros)"
        raise ValueError(
            f"q: codes must lie in [{lo_code}, {hi_code}] for {kind} int4, "
            f"got [{values.min()}, {values.max()}]"
        )

    zvals = None if zeros is None else _concrete(zeros)
    if zvals is not None and zvals.size and (zvals.min() < 0 or zvals.max() > 15 or np.any(zvals % 1)):
        raise ValueError(
            f"zeros: expected integer zero points in [0, 15] (uint4, AWQ/GPTQ style), got values in "
            f"[{zvals.min()}, {zvals.max()}]; round them, or fold a fractional offset into a bias"
        )
    k_pad, n_pad = round_up(k, max(K_ALIGN, group_size)), round_up(n, N_ALIGN)
    half = group_size // 2
    codes = q.astype(jnp.int32) + (8 if zeros is None else 0)  # excess-8 for signed codes
    codes = pad_axis(pad_axis(codes, 0, k_pad), 1, n_pad, 8 if zeros is None else 0) & 0xF  # (K_pad, N_pad)
    codes = codes.reshape(k_pad // group_size, 2, half, n_pad)
    packed = (codes[:, 0] | (codes[:, 1] << 4)).reshape(k_pad // 2, n_pad).astype(jnp.uint8)

    def grid(a: jax.Array) -> jax.Array:
        return pad_axis(pad_axis(jnp.asarray(a).astype(jnp.float32), 0, k_pad // group_size), 1, n_pad)

    return PackedW4(packed, grid(scales), None if zeros is None else grid(zeros), k, n, group_size)


def _codes(w: PackedW4) -> jax.Array:
    """The (K_pad, N_pad) int32 codes of ``w`` (inverse of the packing)."""
    p = w.packed.astype(jnp.int32).reshape(-1, 1, w.group_size // 2, w.packed.shape[1])
    codes = jnp.concatenate([p & 0xF, (p >> 4) & 0xF], axis=1).reshape(-1, w.packed.shape[1])
    return codes - 8 if w.symmetric else codes


def unpack_w4(w: PackedW4) -> jax.Array:
    """The (K, N) float32 dequantized weight ``(q - z) * s`` of ``w``."""
    q = _codes(w).astype(jnp.float32)
    g = w.group_size
    if w.zeros is not None:
        q = q - jnp.repeat(w.zeros, g, axis=0)
    return (q * jnp.repeat(w.scales, g, axis=0))[: w.k, : w.n]


def _check_call(
    x: jax.Array,
    w: Any,
    bias: jax.Array | None,
    *,
    weight_type: type[Any] = PackedW4,
    maker: str = "pack_w4",
    dtypes: tuple[Any, ...] = ACT_DTYPES,
    dtype_fix: str = "is not one of bfloat16, float16, float32; cast x first",
) -> None:
    """Checks of a W4A16 call (``w`` a ``weight_type`` with ``k, n``); the Hopper kernel passes its own."""
    if not isinstance(w, weight_type):
        raise TypeError(f"w: expected a {weight_type.__name__} from {maker}, got {type(w).__name__}")
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"x: expected shape (M, K={w.k}) to match the weight, got {x.shape}")
    if x.dtype not in dtypes:
        raise ValueError(f"x: dtype {x.dtype} {dtype_fix}")
    if bias is not None and bias.shape != (w.n,):
        raise ValueError(f"bias: expected shape (N,) = ({w.n},), got {bias.shape}")


def w4a16_matmul_reference(
    x: jax.Array, w: PackedW4, *, bias: jax.Array | None = None, out_dtype: Any = None
) -> jax.Array:
    """``x @ unpack_w4(w) (+ bias)`` in float32 (HIGHEST precision), cast to ``out_dtype`` (x's)."""
    _check_call(x, w, bias)
    y = jnp.dot(x.astype(jnp.float32), unpack_w4(w), precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(out_dtype or x.dtype)


def _fit(size: int, block: int, minimum: int, multiple: int, name: str) -> int:
    """The largest ``block / 2**i >= minimum`` that divides ``size`` (``size`` a multiple of ``multiple``)."""
    b = block
    while b >= minimum and (size % b or b % multiple):
        b //= 2
    if b < minimum:
        raise ValueError(
            f"blocks.{name}={block}: no power-of-two fraction >= {minimum} divides {size}; "
            f"use a power of two that is a multiple of {multiple}"
        )
    return b


def _unpack_group(p: jax.Array, z: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The two f32 ``(g/2, bn)`` halves ``q - z`` of one group from its int32 byte tile ``p``."""
    zero = 8.0 if z is None else z  # signed codes are stored excess-8
    return (p & 0xF).astype(jnp.float32) - zero, ((p >> 4) & 0xF).astype(jnp.float32) - zero


_TN = (((0,), (1,)), ((), ()))  # dot_general dimension numbers of a^T b^T: contract a's rows, b's columns

# Activation dtype -> (same-width unsigned int, bits of 2**mantissa_bits, 2**mantissa_bits): the bits
# ``magic | n`` of a nibble n read as a float are ``2**mantissa_bits + n`` exactly.
_MAGIC: dict[Any, tuple[Any, int, float]] = {
    jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x4300, 2.0**7),
    jnp.dtype(jnp.float16): (jnp.uint16, 0x6400, 2.0**10),
    jnp.dtype(jnp.float32): (jnp.uint32, 0x4B000000, 2.0**23),
}


def _unpack_group_magic(p: jax.Array, offset: jax.Array | float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The halves ``q - z`` of one group in ``dtype`` from its uint8 tile, with no int->float convert.

    Each nibble is OR-ed into the mantissa of ``2**mantissa_bits`` and the bits reinterpreted as a
    float (``2**mantissa_bits + n``, exact), then ``offset = 2**mantissa_bits + z`` is subtracted
    (exact for integer ``z``): two integer ops and one float op per weight, as in FasterTransformer
    and Marlin, instead of the I2F/F2F conversions that otherwise bound the kernel.
    """
    itype, bits, _ = _MAGIC[jnp.dtype(dtype)]
    p = p.astype(itype)
    lo = jax.lax.bitcast_convert_type((p & 0xF) | bits, dtype)
    hi = jax.lax.bitcast_convert_type((p >> 4) | bits, dtype)
    return lo - offset, hi - offset


# PTX for four packed bytes b0..b3 (one 32-bit register, $2) -> the 16-bit floats 2**m + nibble of
# their low nibbles (SHIFT 0) or high nibbles (SHIFT 4), elements 0, 1 in $0 and 2, 3 in $1: prmt
# spreads two bytes into the two 16-bit lanes of a register, shr moves the wanted nibbles to the
# bottom of each byte, lop3 (LUT 0xEA: (a & b) | c) keeps one nibble per lane and ORs in the
# exponent bits of 2**m. (One result per call: Pallas lowers inline assembly with one result.)
_ASM_UNPACK = """{
.reg .b32 zero, t0, t1;
mov.b32 zero, 0;
prmt.b32 t0, $2, zero, 0x5150;
prmt.b32 t1, $2, zero, 0x5352;
shr.u32 t0, t0, SHIFT;
shr.u32 t1, t1, SHIFT;
lop3.b32 $0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $1, t1, 0x000F000F, MAGIC, 0xEA;
}"""


def asm_unpack_source(dtype: Any, high: bool) -> str:
    """The PTX of :func:`_unpack_group_asm` for 16-bit ``dtype`` (bf16: 2**7 + n, f16: 2**10 + n) and
    the low or ``high`` nibbles."""
    if jnp.dtype(dtype).itemsize != 2:
        raise ValueError(f"unpack='asm' builds 16-bit floats; got activations of {jnp.dtype(dtype)}")
    _, bits, _ = _MAGIC[jnp.dtype(dtype)]
    return _ASM_UNPACK.replace("MAGIC", f"0x{bits:04X}{bits:04X}").replace("SHIFT", "4" if high else "0")


def _unpack_group_asm(p: jax.Array, offset: jax.Array | float, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """:func:`_unpack_group_magic` with the float bits made by PTX four bytes at a time (GPU only)."""
    from jax.experimental.pallas import triton as pltriton

    out = jax.ShapeDtypeStruct(p.shape, dtype)
    lo, hi = (
        pltriton.elementwise_inline_asm(
            asm_unpack_source(dtype, high), args=[p], constraints="=r,=r,r", pack=4, result_shape_dtypes=[out]
        )[0]
        for high in (False, True)
    )
    return lo - offset, hi - offset


def _gpu_kernel(
    *refs: Any,
    group: int,
    groups_per_step: int,
    steps: int,
    total_steps: int,
    has_zeros: bool,
    has_bias: bool,
    precision: Any,
    swap_ab: bool,
    unpack: str,
    rows: int,
) -> None:
    """One (block_m, block_n) output tile over ``steps`` of the ``total_steps`` K steps (of
    ``groups_per_step`` groups each), starting at step ``program_id(2) * steps``. ``x`` and the
    output have ``rows`` (M) rows, not padded to the block: the last M block loads zeros past
    them and writes only them, so at decode (M = 1 in a 16-row block) nothing pads ``x`` and the
    kernel writes one row of (partial) sums, not 16.

    ``swap_ab`` computes the transposed tile ``w^T x^T`` (block_n, block_m): the dequantized weight
    becomes the dot's left operand, which Hopper's ``wgmma`` may read from registers (its right
    operand must sit in shared memory), and the small M the right operand's narrow N.

    ``unpack``: ``"magic"`` (float bits, :func:`_unpack_group_magic`), ``"asm"`` (the same float bits
    built four bytes at a time by PTX, :func:`_unpack_group_asm`; 16-bit activations, GPU only) or
    ``"convert"`` (int32 -> f32 -> activation dtype conversions)."""
    x_ref, p_ref, s_ref = refs[:3]  # (bm, K_pad), (K_pad // 2, bn) uint8, (G, bn) f32
    z_ref = refs[3] if has_zeros else None  # (G, bn) f32
    b_ref = refs[3 + has_zeros] if has_bias else None  # (1, bn) f32
    o_ref = refs[-1]  # (bm, bn) or (1, bm, bn) f32 partial sums when K is split
    half = group // 2
    dt = x_ref.dtype
    bm, bn = o_ref.shape[-2:]
    # x and the output have M rows: unless M is a multiple of block_m, the last block is masked
    x_mask = None if rows % bm == 0 else row_mask((bm, half), bm, rows)
    step_of = k_range(steps, total_steps)

    def load_x(start: Any) -> jax.Array:
        """Columns ``start .. start + g/2`` of the block's rows of ``x``: zeros past row M."""
        return load_rows(x_ref.at[:, pl.ds(start, half)], rows, bm, x_mask)

    def body(step: Any, acc: jax.Array) -> jax.Array:
        # The last K range may be short: its steps past the end repeat the last step, masked out.
        t, keep = step_of(step)
        for j in range(groups_per_step):
            grp = t * groups_per_step + j
            p = p_ref[pl.ds(grp * half, half), :]  # (g/2, bn) uint8
            z = None if z_ref is None else z_ref[pl.ds(grp, 1), :]  # (1, bn) f32
            if unpack != "convert":
                magic = _MAGIC[dt][2]
                offset = magic + 8.0 if z is None else (z + magic).astype(dt)
                unpack_group = _unpack_group_asm if unpack == "asm" else _unpack_group_magic
                lo, hi = unpack_group(p, offset, dt)
            else:
                lo, hi = _unpack_group(p.astype(jnp.int32), z)
                lo, hi = lo.astype(dt), hi.astype(dt)
            x_lo = load_x(grp * group)  # (bm, g/2)
            x_hi = load_x(grp * group + half)  # (bm, g/2)
            scale = s_ref[pl.ds(grp, 1), :]  # (1, bn)
            scale = scale if keep is None else scale * keep
            if swap_ab:  # (bn, bm) += (w^T x^T) * s^T
                d = jax.lax.dot_general(
                    lo, x_lo, _TN, preferred_element_type=jnp.float32, precision=precision
                )
                d += jax.lax.dot_general(
                    hi, x_hi, _TN, preferred_element_type=jnp.float32, precision=precision
                )
                acc += d * scale.T
            else:  # (bm, bn) += (x w) * s
                d = jnp.dot(x_lo, lo, preferred_element_type=jnp.float32, precision=precision)
                d += jnp.dot(x_hi, hi, preferred_element_type=jnp.float32, precision=precision)
                acc += d * scale
        return acc

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bn, bm) if swap_ab else (bm, bn), jnp.float32))
    if swap_ab:
        acc = acc.T
    if b_ref is not None:
        acc += b_ref[...]
    store_rows(o_ref, acc.reshape(o_ref.shape).astype(o_ref.dtype), rows)


def _tpu_kernel(
    *refs: Any, group: int, groups_per_block: int, has_zeros: bool, has_bias: bool, precision: Any
) -> None:
    """Accumulate one (bm, bk) x (bk, bn) product into VMEM; K is the last ("arbitrary") grid axis."""
    x_ref, p_ref, s_ref = refs[:3]  # (bm, bk), (bk // 2, bn) uint8, (G, bn) f32 (all groups)
    z_ref = refs[3] if has_zeros else None  # (G, bn) f32
    b_ref = refs[3 + has_zeros] if has_bias else None  # (1, bn) f32
    o_ref, acc_ref = refs[-2:]  # (bm, bn), (bm, bn) f32 scratch
    k = pl.program_id(2)
    half = group // 2

    @pl.when(k == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    p_all = p_ref[...].astype(jnp.int32)  # (bk // 2, bn)
    parts = []
    for j in range(groups_per_block):
        grp = k * groups_per_block + j
        s = s_ref[pl.ds(grp, 1), :]  # (1, bn)
        z = None if z_ref is None else z_ref[pl.ds(grp, 1), :]
        lo, hi = _unpack_group(p_all[j * half : (j + 1) * half], z)
        parts += [lo * s, hi * s]
    w = jnp.concatenate(parts, axis=0).astype(x_ref.dtype)  # (bk, bn)
    acc_ref[...] += jnp.dot(x_ref[...], w, preferred_element_type=jnp.float32, precision=precision)

    @pl.when(k == pl.num_programs(2) - 1)
    def _finish() -> None:
        acc = acc_ref[...]
        if b_ref is not None:
            acc += b_ref[...]
        o_ref[...] = acc.astype(o_ref.dtype)


def w4a16_matmul(
    x: jax.Array,
    w: PackedW4,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = None,
    blocks: Blocks | Mapping[str, Any] | None = None,
    backend: str | None = None,
    split_k: int | None = None,
    swap_ab: bool = False,
    unpack: str = "magic",
) -> jax.Array:
    """``y = x @ dequant(w) (+ bias)`` with f32 accumulation, by a Pallas kernel.

    ``x`` (M, K) bf16/f16/f32; ``w`` from :func:`pack_w4`; ``bias`` (N,); ``out_dtype`` defaults to
    ``x.dtype``. ``blocks`` overrides the block table (``choose_blocks``; powers of two; a block that
    does not divide the padded weight is halved until it does). ``backend``: ``"gpu"``, ``"tpu"``,
    ``"interpret"`` or None (default device). ``split_k`` (GPU/interpret): number of K ranges run by
    separate programs and summed in f32 (None: 1, or on GPU enough to reach ~256 programs).
    ``swap_ab`` (GPU/interpret): each program computes its tile transposed, ``(w^T x^T)^T``, so
    the dequantized weight is the dot's left operand (same values; an option to time at small M).
    ``unpack`` (GPU/interpret): how nibbles become floats, one of :data:`UNPACKS` (same values;
    ``"asm"`` is PTX, so ``backend="gpu"`` and 16-bit ``x`` only).
    """
    _check_call(x, w, bias)
    backend = resolve_backend(backend)
    if swap_ab and backend == "tpu":
        raise ValueError("swap_ab=True is an option of the GPU kernel; the TPU kernel has none")
    if unpack not in UNPACKS:
        raise ValueError(f"unpack={unpack!r}: expected one of {UNPACKS}")
    if unpack == "asm":
        if backend != "gpu":
            raise ValueError(f"unpack='asm' is PTX inline assembly: backend='gpu' only, not {backend!r}")
        asm_unpack_source(x.dtype, False)  # 16-bit activations only
    kernel = "tpu" if backend == "tpu" else "gpu"
    return _w4a16(x, w, bias, out_dtype, blocks, backend, split_k, kernel, swap_ab=swap_ab, unpack=unpack)


def _w4a16(
    x: jax.Array,
    w: PackedW4,
    bias: jax.Array | None,
    out_dtype: Any,
    blocks: Any,
    backend: str,
    split_k: int | None,
    kernel: str,
    *,
    swap_ab: bool = False,
    unpack: str = "magic",
    gpu_body: Any = None,
) -> jax.Array:
    """:func:`w4a16_matmul` with the kernel body (``"gpu"`` or ``"tpu"``) named: tests interpret both.

    ``gpu_body`` replaces :func:`_gpu_kernel` on the same grid, blocks and operands (it receives the
    same keyword arguments): ``experiments.kernels.profile_w4a16`` times parts of the kernel that way."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    m = x.shape[0]
    b = choose_blocks("w4a16", backend, m, blocks)
    k_pad, n_pad = 2 * w.packed.shape[0], w.packed.shape[1]
    g, groups = w.group_size, w.scales.shape[0]
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    tpu = kernel == "tpu"
    min_m = 16 if backend == "gpu" else (16 if x.dtype.itemsize == 2 else 8)
    bm = min(b.block_m, max(min_m, 1 << max(m - 1, 0).bit_length()))
    if backend == "gpu" and bm < 16:
        raise ValueError(f"blocks.block_m={b.block_m}: Triton dots need block_m >= 16")
    bn = _fit(n_pad, b.block_n, 128 if tpu else 16, 128 if tpu else 1, "block_n")
    bk = _fit(k_pad, max(b.block_k, g), g, 128 if tpu else g, "block_k")
    xp = pad_axis(x, 1, k_pad)  # (M, K_pad); the TPU kernel's blocks need M padded too
    if tpu:
        xp = pad_axis(xp, 0, bm)
    m_pad = round_up(m, bm)
    operands = [xp, w.packed, w.scales] + ([] if w.zeros is None else [w.zeros])
    bias_row = None if bias is None else pad_axis(bias.astype(jnp.float32).reshape(1, -1), 1, n_pad)
    params = compiler_params(backend, b, ("parallel", "parallel", "arbitrary"))
    gm, gn, steps = m_pad // bm, n_pad // bn, k_pad // bk
    has_z = w.zeros is not None

    if tpu:
        in_specs = [
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bk // 2, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((groups, bn), lambda i, j, k: (0, j)),
        ] + [pl.BlockSpec((groups, bn), lambda i, j, k: (0, j))] * has_z
        if bias_row is not None:
            in_specs.append(pl.BlockSpec((1, bn), lambda i, j, k: (0, j)))
            operands.append(bias_row)
        from jax.experimental.pallas import tpu as pltpu

        y = pl.pallas_call(
            functools.partial(
                _tpu_kernel,
                group=g,
                groups_per_block=bk // g,
                has_zeros=has_z,
                has_bias=bias_row is not None,
                precision=precision,
            ),
            out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
            grid=(gm, gn, steps),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
            compiler_params=params,
            interpret=backend == "interpret",
        )(*operands)
        return y[:m, : w.n]

    # K ranges of `per` steps, the last one possibly shorter (None on the interpreter: one range)
    split, per = split_k_ranges(gm * gn, steps, 1 if split_k is None and backend != "gpu" else split_k)
    fused_bias = bias_row is not None and split == 1
    in_specs = [
        pl.BlockSpec((bm, k_pad), lambda i, j, s: (i, 0)),
        pl.BlockSpec((k_pad // 2, bn), lambda i, j, s: (0, j)),
        pl.BlockSpec((groups, bn), lambda i, j, s: (0, j)),
    ] + [pl.BlockSpec((groups, bn), lambda i, j, s: (0, j))] * has_z
    if fused_bias and bias_row is not None:
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, s: (0, j)))
        operands.append(bias_row)
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((m, n_pad), out_dtype)  # the last M block is masked
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split, m, n_pad), jnp.float32)
        out_spec = pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j))
    y = pl.pallas_call(
        functools.partial(
            gpu_body or _gpu_kernel,
            group=g,
            groups_per_step=bk // g,
            steps=per,
            total_steps=steps,
            has_zeros=has_z,
            has_bias=fused_bias,
            precision=precision,
            swap_ab=swap_ab,
            unpack=unpack,
            rows=m,
        ),
        out_shape=out_shape,
        grid=(gm, gn, split),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=params,
        interpret=backend == "interpret",
    )(*operands)
    if split > 1:  # the real rows and columns of the partial sums only (the kernel wrote no others)
        y = y[:, :m, : w.n].sum(axis=0)
        if bias_row is not None:
            y = y + bias_row[:, : w.n]
        return y.astype(out_dtype)
    return y[:m, : w.n]
