"""W4A16 weight-only matmul: 16/32-bit activations times int4 weights, dequantized inside a Pallas kernel.

The weight is int4 codes :math:`q` with a scale :math:`s` (and optionally a zero point :math:`z`)
per group of ``group_size`` (:math:`g`) consecutive rows along the contraction axis :math:`K`:

.. math::

    w_{kn} = (q_{kn} - z_{\\lfloor k/g \\rfloor n})\\, s_{\\lfloor k/g \\rfloor n}, \\qquad
    y_{mn} = \\sum_k x_{mk} w_{kn} + b_n
           = \\sum_j s_{jn} \\sum_{k \\in \\text{group } j} x_{mk} (q_{kn} - z_{jn}) + b_n,

with :math:`q \\in [-8, 7]` (signed, :math:`z = 0`) or :math:`q \\in [0, 15]` (asymmetric, AWQ/GPTQ
style uint4). :func:`pack_w4` stores two codes per byte (:class:`PackedW4`), a quarter of the bytes
of a bf16 weight.

**Packing layout.** :math:`K` is padded to ``K_pad`` (a multiple of ``max(128, g)``) and :math:`N`
to ``N_pad`` (a multiple of 128). Group :math:`j` occupies the packed rows
:math:`j g/2 \\ldots j g/2 + g/2 - 1`; packed row :math:`j g/2 + r` holds in its low nibble the code
of row :math:`jg + r` and in its high nibble the code of row :math:`jg + g/2 + r`. Signed codes are
stored excess-8 (nibble :math:`q + 8`), unsigned ones as they are, so a nibble :math:`n` always
decodes as :math:`n - z` (:math:`z = 8` when symmetric). One group is one contiguous ``(g/2, N)``
byte tile, and its two halves multiply the contiguous activation slices ``x[:, jg : jg+g/2]`` and
``x[:, jg+g/2 : jg+g]``.

**Bodies** (grid of :mod:`qjax.kernels.launch`). GPU: per K step, ``block_k / g`` groups; each
group's byte tile is unpacked in registers straight into the activation dtype
(:func:`unpack_group_magic`: ``bits(2**7) | n`` read as bf16 is ``128 + n``; ``q - z`` is exact for
integer zero points) and ``acc += (x_lo @ lo + x_hi @ hi) * s_j`` in float32, so no weight is rounded
to 16 bits. Triton dots need ``block_m >= 16`` and ``g >= 32``. TPU: the ``(block_k/2, block_n)``
byte tile is unpacked per group into ``(q - z) * s`` in float32, cast to the activation dtype (this
rounds the dequantized weight for bf16/f16 activations) and fed to one dot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Unpack

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from qjax.kernels.backend import Backend, Body, resolve_backend, resolve_body
from qjax.kernels.common import epilogue, pad_axis, round_up
from qjax.kernels.launch import KRanges, LaunchOptions, launch, load_rows, plan_grid, row_mask, store_rows
from qjax.kernels.tuning import Blocks, choose_blocks

ACT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
N_ALIGN = 128
K_ALIGN = 128


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


def packed_codes(w: PackedW4) -> jax.Array:
    """The (K_pad, N_pad) int32 codes of ``w`` (inverse of the packing)."""
    p = w.packed.astype(jnp.int32).reshape(-1, 1, w.group_size // 2, w.packed.shape[1])
    codes = jnp.concatenate([p & 0xF, (p >> 4) & 0xF], axis=1).reshape(-1, w.packed.shape[1])
    return codes - 8 if w.symmetric else codes


def unpack_w4(w: PackedW4) -> jax.Array:
    """The (K, N) float32 dequantized weight ``(q - z) * s`` of ``w``."""
    q = packed_codes(w).astype(jnp.float32)
    g = w.group_size
    if w.zeros is not None:
        q = q - jnp.repeat(w.zeros, g, axis=0)
    return (q * jnp.repeat(w.scales, g, axis=0))[: w.k, : w.n]


def check_w4a16_call(
    x: jax.Array,
    w: Any,
    bias: jax.Array | None,
    *,
    weight_type: type[Any] = PackedW4,
    maker: str = "pack_w4",
    dtypes: tuple[Any, ...] = ACT_DTYPES,
    dtype_fix: str = "is not one of bfloat16, float16, float32; cast x first",
) -> None:
    """Checks of a W4A16 call: ``w`` a ``weight_type`` (with ``k, n``) made by ``maker``, ``x``
    ``(M, K)`` of one of ``dtypes``, ``bias`` ``(N,)`` or None."""
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
    check_w4a16_call(x, w, bias)
    y = jnp.dot(x.astype(jnp.float32), unpack_w4(w), precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(out_dtype or x.dtype)


# ------------------------------------------------------------------------------------------------
# Unpacking one group: (g/2, block_n) packed bytes -> the two halves q - z


# One group's unpack: (the uint8 byte tile (g/2, bn), the group's zero points (1, bn) f32 or None
# for signed codes, the activation dtype) -> the halves q - z (low nibbles, high nibbles) in it.
UnpackGroup = Callable[[jax.Array, jax.Array | None, Any], tuple[jax.Array, jax.Array]]

# Activation dtype -> (same-width unsigned int, bits of 2**mantissa_bits, 2**mantissa_bits): the bits
# ``magic | n`` of a nibble n read as a float are ``2**mantissa_bits + n`` exactly.
MAGIC: dict[Any, tuple[Any, int, float]] = {
    jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x4300, 2.0**7),
    jnp.dtype(jnp.float16): (jnp.uint16, 0x6400, 2.0**10),
    jnp.dtype(jnp.float32): (jnp.uint32, 0x4B000000, 2.0**23),
}


def _halves(p: jax.Array, z: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The two f32 ``(g/2, bn)`` halves ``q - z`` of one group from its int32 byte tile ``p``."""
    zero = 8.0 if z is None else z  # signed codes are stored excess-8
    return (p & 0xF).astype(jnp.float32) - zero, ((p >> 4) & 0xF).astype(jnp.float32) - zero


def magic_offset(z: jax.Array | None, dtype: Any) -> jax.Array | float:
    """``2**mantissa_bits + z`` in ``dtype`` (``+ 8`` for signed codes): what a float-bits nibble
    ``2**mantissa_bits + n`` minus it leaves, ``n - z``."""
    magic = MAGIC[jnp.dtype(dtype)][2]
    return magic + 8.0 if z is None else (z + magic).astype(dtype)


def unpack_group_magic(p: jax.Array, z: jax.Array | None, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The halves ``q - z`` of one group in ``dtype`` from its uint8 tile, with no int->float convert.

    Each nibble is OR-ed into the mantissa of ``2**mantissa_bits`` and the bits reinterpreted as a
    float (``2**mantissa_bits + n``, exact), then ``2**mantissa_bits + z`` is subtracted (exact for
    integer ``z``): two integer ops and one float op per weight, as in FasterTransformer and Marlin.
    """
    itype, bits, _ = MAGIC[jnp.dtype(dtype)]
    p = p.astype(itype)
    lo = jax.lax.bitcast_convert_type((p & 0xF) | bits, dtype)
    hi = jax.lax.bitcast_convert_type((p >> 4) | bits, dtype)
    offset = magic_offset(z, dtype)
    return lo - offset, hi - offset


def unpack_group_convert(p: jax.Array, z: jax.Array | None, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The halves ``q - z`` of one group by int32 -> float32 -> ``dtype`` conversions."""
    lo, hi = _halves(p.astype(jnp.int32), z)
    return lo.astype(dtype), hi.astype(dtype)


# ------------------------------------------------------------------------------------------------
# Kernel bodies


class GroupProduct(NamedTuple):
    """How a GPU program adds a group to its float32 accumulator ``acc``:
    ``acc += (dot(x_lo, lo) + dot(x_hi, hi)) * orient(s)``, with ``x_*`` ``(block_m, g/2)``, the
    halves ``(g/2, block_n)`` and the group's scales ``s`` ``(1, block_n)``; ``init(block_m,
    block_n)`` is the zero accumulator and ``finish(acc)`` the ``(block_m, block_n)`` tile."""

    init: Callable[[int, int], jax.Array]
    dot: Callable[[jax.Array, jax.Array, Any], jax.Array]
    orient: Callable[[jax.Array], jax.Array]
    finish: Callable[[jax.Array], jax.Array]


def _dot(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)  # (block_m, block_n)


def _same(a: jax.Array) -> jax.Array:
    return a


PLAIN = GroupProduct(lambda bm, bn: jnp.zeros((bm, bn), jnp.float32), _dot, _same, _same)


def gpu_kernel(
    x_ref: Any,  # (block_m, K_pad): the block's rows of x (the last M block masked)
    p_ref: Any,  # (K_pad // 2, block_n) uint8 packed codes
    s_ref: Any,  # (G, block_n) f32 scales
    *refs: Any,  # [z_ref (G, block_n) f32], [b_ref (1, block_n) f32], o_ref (block_m, block_n) or
    # (1, block_m, block_n) f32 partial sums when K is split
    group: int,
    groups_per_step: int,
    ranges: KRanges,
    has_zeros: bool,
    has_bias: bool,
    precision: Any,
    unpack: UnpackGroup,
    product: GroupProduct,
) -> None:
    """One output tile over this program's K range, ``groups_per_step`` groups a step: each
    group unpacked by ``unpack`` and added to the accumulator by ``product``."""
    z_ref = refs[0] if has_zeros else None
    b_ref = refs[has_zeros] if has_bias else None
    o_ref = refs[-1]
    half, dt, rows = group // 2, x_ref.dtype, ranges.rows
    bm, bn = o_ref.shape[-2:]
    x_mask = None if rows % bm == 0 else row_mask((bm, half), bm, rows)
    step_of = ranges.step_of()

    def load_x(start: Any) -> jax.Array:
        """Columns ``start .. start + g/2`` of the block's rows of ``x``: zeros past row M."""
        return load_rows(x_ref.at[:, pl.ds(start, half)], rows, bm, x_mask)

    def body(step: Any, acc: jax.Array) -> jax.Array:
        t, keep = step_of(step)  # a short last K range repeats the last step, masked out
        for j in range(groups_per_step):
            grp = t * groups_per_step + j
            z = None if z_ref is None else z_ref[pl.ds(grp, 1), :]  # (1, block_n)
            lo, hi = unpack(p_ref[pl.ds(grp * half, half), :], z, dt)  # (g/2, block_n) each
            scale = s_ref[pl.ds(grp, 1), :]  # (1, block_n)
            scale = scale if keep is None else scale * keep
            d = product.dot(load_x(grp * group), lo, precision)
            d += product.dot(load_x(grp * group + half), hi, precision)
            acc += d * product.orient(scale)
        return acc

    acc = product.finish(jax.lax.fori_loop(0, ranges.steps, body, product.init(bm, bn)))
    epi = {} if b_ref is None else {"bias": b_ref[...]}
    store_rows(o_ref, epilogue(acc, epi, o_ref.dtype).reshape(o_ref.shape), rows)


def tpu_kernel(
    x_ref: Any,  # (block_m, block_k)
    p_ref: Any,  # (block_k // 2, block_n) uint8
    s_ref: Any,  # (G, block_n) f32: all groups
    *refs: Any,  # [z_ref (G, block_n)], [b_ref (1, block_n)], o_ref (block_m, block_n), acc_ref (VMEM f32)
    group: int,
    groups_per_block: int,
    ranges: KRanges,
    has_zeros: bool,
    has_bias: bool,
    precision: Any,
) -> None:
    """Accumulate one (block_m, block_k) x (block_k, block_n) product into VMEM."""
    z_ref = refs[0] if has_zeros else None
    b_ref = refs[has_zeros] if has_bias else None
    o_ref, acc_ref = refs[-2:]
    k = pl.program_id(2)
    half = group // 2

    @pl.when(k == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    p_all = p_ref[...].astype(jnp.int32)  # (block_k // 2, block_n)
    parts = []
    for j in range(groups_per_block):
        grp = k * groups_per_block + j
        s = s_ref[pl.ds(grp, 1), :]  # (1, block_n)
        z = None if z_ref is None else z_ref[pl.ds(grp, 1), :]
        lo, hi = _halves(p_all[j * half : (j + 1) * half], z)
        parts += [lo * s, hi * s]
    w = jnp.concatenate(parts, axis=0).astype(x_ref.dtype)  # (block_k, block_n)
    acc_ref[...] += jnp.dot(x_ref[...], w, preferred_element_type=jnp.float32, precision=precision)

    @pl.when(k == ranges.total - 1)
    def _finish() -> None:
        epi = {} if b_ref is None else {"bias": b_ref[...]}
        o_ref[...] = epilogue(acc_ref[...], epi, o_ref.dtype)


# ------------------------------------------------------------------------------------------------
# The call


def w4a16_matmul(
    x: jax.Array,
    w: PackedW4,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = None,
    **launch: Unpack[LaunchOptions],
) -> jax.Array:
    """``y = x @ dequant(w) (+ bias)`` with f32 accumulation, by a Pallas kernel.

    ``x`` (M, K) bf16/f16/f32; ``w`` from :func:`pack_w4`; ``bias`` (N,); ``out_dtype`` defaults to
    ``x.dtype``. ``launch`` (:class:`~qjax.kernels.launch.LaunchOptions`): ``blocks`` overrides the
    block table (powers of two; a block that does not divide the padded weight is halved until it
    does); ``backend``; ``split_k`` (GPU body): K ranges run by separate programs and summed in f32
    (None: 1, or on GPU enough to reach ~256 programs); ``body``: which body the interpreter runs.
    """
    check_w4a16_call(x, w, bias)
    return launch_w4a16(x, w, bias, out_dtype, **launch)


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


def _w4a16_blocks(x: jax.Array, w: PackedW4, chosen: Blocks, backend: Backend, body: Body) -> Blocks:
    """The blocks of a call: ``block_m`` no larger than M needs, ``block_n`` and ``block_k`` halved
    until they divide the packed weight (``block_k`` whole groups)."""
    tpu = body == Body.TPU
    min_m = 16 if backend == Backend.GPU else (16 if x.dtype.itemsize == 2 else 8)
    bm = min(chosen.block_m, max(min_m, 1 << max(x.shape[0] - 1, 0).bit_length()))
    if backend == Backend.GPU and bm < 16:
        raise ValueError(f"blocks.block_m={chosen.block_m}: Triton dots need block_m >= 16")
    k_pad, n_pad = 2 * w.packed.shape[0], w.packed.shape[1]
    bn = _fit(n_pad, chosen.block_n, 128 if tpu else 16, 128 if tpu else 1, "block_n")
    bk = _fit(k_pad, max(chosen.block_k, w.group_size), w.group_size, 128 if tpu else w.group_size, "block_k")
    return Blocks(bm, bn, bk, chosen.num_warps, chosen.num_stages)


def launch_w4a16(
    x: jax.Array,
    w: PackedW4,
    bias: jax.Array | None,
    out_dtype: Any,
    *,
    blocks: Blocks | Mapping[str, int] | None = None,
    backend: Backend | str | None = None,
    split_k: int | None = None,
    body: Body | str | None = None,
    gpu_body: Callable[..., None] = gpu_kernel,
    unpack: UnpackGroup = unpack_group_magic,
    product: GroupProduct = PLAIN,
) -> jax.Array:
    """:func:`w4a16_matmul` on checked operands. ``gpu_body`` runs on the GPU grid with the keyword
    arguments of :func:`gpu_kernel`, ``unpack`` and ``product`` among them (the experimental
    variants and the profile of ``experiments.kernels.profile_w4a16`` replace them)."""
    be = resolve_backend(backend)
    bd = resolve_body(body, be)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    bl = _w4a16_blocks(x, w, choose_blocks("w4a16", be, x.shape[0], blocks), be, bd)
    k_pad, n_pad = 2 * w.packed.shape[0], w.packed.shape[1]
    g, groups = w.group_size, w.scales.shape[0]
    grid = plan_grid(bd, be, bl, m=x.shape[0], n_pad=n_pad, k_steps=k_pad // bl.block_k, split_k=split_k)
    bias_row = None if bias is None else pad_axis(bias.astype(jnp.float32).reshape(1, -1), 1, n_pad)
    has_bias = bias_row is not None and grid.fused  # else added after XLA's sum of the partial sums
    operands = [grid.pad_rows(pad_axis(x, 1, k_pad)), w.packed, w.scales] + (
        [] if w.zeros is None else [w.zeros]
    )
    in_specs = [grid.x_spec(k_pad, bl.block_k)]
    kw: dict[str, Any] = dict(
        group=g,
        has_zeros=w.zeros is not None,
        has_bias=has_bias,
        precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    if bd == Body.GPU:
        in_specs.append(grid.columns_spec(k_pad // 2))  # (K_pad // 2, block_n)
        fn: Any = functools.partial(
            gpu_body, groups_per_step=bl.block_k // g, unpack=unpack, product=product, **kw
        )
    else:
        in_specs.append(pl.BlockSpec((bl.block_k // 2, bl.block_n), lambda i, j, k: (k, j)))
        fn = functools.partial(tpu_kernel, groups_per_block=bl.block_k // g, **kw)
    in_specs += [grid.columns_spec(groups)] * (2 if w.zeros is not None else 1)  # (G, block_n)
    if bias_row is not None and has_bias:
        operands.append(bias_row)
        in_specs.append(grid.columns_spec(1))
    bias_epi = {} if bias_row is None else {"bias": bias_row[:, : w.n]}
    finish = functools.partial(epilogue, epi=bias_epi, out_dtype=out_dtype)
    return launch(grid, fn, operands, in_specs, n=w.n, out_dtype=out_dtype, name="qjax_w4a16", finish=finish)
