"""Dynamic per-token activation quantization, fused: one kernel reads a block of rows, finds each
row's absolute maximum, and writes the quantized values and the row scales.

.. math::

    S_m = \\max\\big(\\max_k |x_{mk}| \\cdot \\mathrm{fl}(1/q_{max}),\\ 2^{-126}\\big), \\qquad
    q_{mk} = \\operatorname{clip}\\big(\\operatorname{round}(x_{mk} \\cdot \\mathrm{fl}(1/S_m)),
    -q_{max}, q_{max}\\big)

int8: :math:`q_{max} = 127` (symmetric narrow range), round half to even; float8_e4m3fn:
:math:`q_{max} = 448`, rounding onto the e4m3 grid (nearest, ties to even). This is exactly
``qjax.quantize(x, QuantSpec(dtype=..., granularity="per_token"))`` (see
:func:`quantize_per_token_reference`): the same reciprocal products, the same smallest scale (no
NaN or Inf from any finite row, all-zero rows included), bit for bit.

Bodies:

* **GPU** (Triton): grid over row blocks; the row is walked in power-of-two chunks (masked loads
  and stores at the ragged ends, so neither M nor K is padded): a first loop takes the absmax, a
  second quantizes and stores. ``1/S`` is computed with ``rcp.rn.f32`` (IEEE round to nearest),
  since Triton's float32 division is the approximate ``div.full.f32``.
* **TPU** (Mosaic) and the interpreter: grid over row blocks of whole rows ``(block_m, K)`` in
  VMEM; the ragged last row block is handled by Pallas (its extra rows are never written back).

Rounding half to even is spelled with ``floor`` (Triton has no ``round``): exact for
:math:`|y| \\le 127`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from qjax.kernels.backend import Backend, Body, resolve_backend, resolve_body
from qjax.kernels.launch import compiler_params
from qjax.kernels.tuning import Blocks, choose_blocks
from qjax.numerics.formats import MIN_SCALE
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import QuantSpec

_QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
_CHUNK_ELEMENTS = 8192  # GPU: elements of x one program holds at a time (64 floats a thread at 4 warps)


def _format_name(dtype: Any) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in _QMAX:
        raise ValueError(f"dtype={name!r}: quantize_per_token supports jnp.int8 and jnp.float8_e4m3fn")
    return name


def _check_x(x: Any) -> jax.Array:
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"x must be a float array (bfloat16, float16 or float32) of shape (M, K); got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if jnp.dtype(x.dtype).itemsize > 4 or jnp.dtype(x.dtype).itemsize < 2:
        raise TypeError(f"x has dtype {x.dtype}; expected bfloat16, float16 or float32")
    if x.ndim != 2:
        raise ValueError(
            f"x has shape {tuple(x.shape)} (rank {x.ndim}), expected (M, K); flatten leading axes "
            "first, e.g. x.reshape(-1, x.shape[-1])"
        )
    return jnp.asarray(x)


def round_half_even(y: jax.Array) -> jax.Array:
    """Round float32 ``y`` (|y| < 2^22) to the nearest integer, ties to even, with floor only."""
    f = jnp.floor(y)
    d = y - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return jnp.where(up, f + 1.0, f)


def _encode(x: jax.Array, inv: jax.Array, name: str) -> jax.Array:
    """Values of float32 ``x`` (block_m, k) times ``inv`` (block_m, 1) in format ``name``."""
    qmax = _QMAX[name]
    # Clip before rounding: round(clip(y)) == clip(round(y)) for the integer bound qmax.
    y = jnp.clip(x * inv, -qmax, qmax)
    if name == "int8":
        return round_half_even(y).astype(jnp.int32).astype(jnp.int8)
    return y.astype(jnp.float8_e4m3fn)  # round to nearest even onto the e4m3 grid


def _scale(amax: jax.Array, name: str) -> jax.Array:
    inv_qmax = float(np.float32(1.0 / _QMAX[name]))  # fl(1/qmax), as qjax.numerics.formats
    return jnp.maximum(amax * inv_qmax, MIN_SCALE)


def _reciprocal_exact(s: jax.Array) -> jax.Array:
    return 1.0 / s


def _reciprocal_ptx(s: jax.Array) -> jax.Array:
    from jax.experimental.pallas import triton as plgpu

    (r,) = plgpu.elementwise_inline_asm(
        "rcp.rn.f32 $0, $1;",
        args=[s],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(s.shape, jnp.float32)],
    )
    return r


def _rows_kernel(x_ref: Any, q_ref: Any, s_ref: Any, *, name: str) -> None:
    # x_ref: (block_m, K); q_ref: (block_m, K); s_ref: (block_m, 1)
    x = x_ref[...].astype(jnp.float32)
    scale = _scale(jnp.max(jnp.abs(x), axis=1, keepdims=True), name)  # (block_m, 1)
    q_ref[...] = _encode(x, _reciprocal_exact(scale), name)
    s_ref[...] = scale


def _chunked_kernel(
    x_ref: Any,
    q_ref: Any,
    s_ref: Any,
    *,
    name: str,
    m: int,
    k: int,
    ck: int,
    nc: int,
    recip: Callable[[jax.Array], jax.Array],
) -> None:
    # x_ref, q_ref: (block_m, nc * ck) views starting at this block's first row (masked past M, K);
    # s_ref: (block_m, 1)
    from jax.experimental.pallas import triton as plgpu

    bm = s_ref.shape[0]
    rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)  # (block_m, 1)
    row_ok = rows < m

    def mask(c: jax.Array) -> jax.Array:
        cols = c * ck + lax.broadcasted_iota(jnp.int32, (1, ck), 1)  # (1, ck)
        return row_ok & (cols < k)  # (block_m, ck)

    def load(c: jax.Array) -> jax.Array:
        start = pl.multiple_of(c * ck, ck)
        chunk = plgpu.load(x_ref.at[:, pl.ds(start, ck)], mask=mask(c), other=0.0)  # (block_m, ck)
        return chunk.astype(jnp.float32)

    def absmax(c: jax.Array, amax: jax.Array) -> jax.Array:
        return jnp.maximum(amax, jnp.max(jnp.abs(load(c)), axis=1, keepdims=True))

    amax = lax.fori_loop(0, nc, absmax, jnp.zeros((bm, 1), jnp.float32))  # (block_m, 1)
    scale = _scale(amax, name)
    inv = recip(scale)

    def write(c: jax.Array, carry: jax.Array) -> jax.Array:
        start = pl.multiple_of(c * ck, ck)
        plgpu.store(q_ref.at[:, pl.ds(start, ck)], _encode(load(c), inv, name), mask=mask(c))
        return carry

    lax.fori_loop(0, nc, write, jnp.zeros((), jnp.int32))
    plgpu.store(s_ref, scale, mask=row_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _quantize_call(
    x: jax.Array, name: str, blocks: Blocks | Mapping[str, int] | None, backend: Any, body: Any
) -> tuple[jax.Array, jax.Array]:
    be = resolve_backend(backend)
    m, k = x.shape
    bl = choose_blocks("act_quant", be, m, blocks)
    bm = bl.block_m
    if be == Backend.GPU and (bm & (bm - 1)):
        raise ValueError(f"blocks.block_m={bm}: Triton needs a power of two")
    if be == Backend.TPU and bm % 32:
        raise ValueError(f"blocks.block_m={bm}: Mosaic needs a multiple of 32 for 8-bit outputs")
    out_dtype = jnp.int8 if name == "int8" else jnp.float8_e4m3fn
    grid = (pl.cdiv(m, bm),)
    if resolve_body(body, be, interpreted=Body.TPU) == Body.GPU:
        ck = min(_next_pow2(k), max(16, _CHUNK_ELEMENTS // bm))
        nc = pl.cdiv(k, ck)
        recip = _reciprocal_ptx if be == Backend.GPU else _reciprocal_exact
        fn = functools.partial(_chunked_kernel, name=name, m=m, k=k, ck=ck, nc=nc, recip=recip)
        row_block = (bm, nc * ck)
    else:
        fn = functools.partial(_rows_kernel, name=name)
        row_block = (bm, k)
    q, s = pl.pallas_call(
        fn,
        out_shape=(jax.ShapeDtypeStruct((m, k), out_dtype), jax.ShapeDtypeStruct((m, 1), jnp.float32)),
        grid=grid,
        in_specs=[pl.BlockSpec(row_block, lambda i: (i, 0))],
        out_specs=(pl.BlockSpec(row_block, lambda i: (i, 0)), pl.BlockSpec((bm, 1), lambda i: (i, 0))),
        compiler_params=compiler_params(be, bl, ("parallel",)),
        interpret=be == Backend.INTERPRET,
        name=f"qjax_act_quant_{name}",
    )(x)
    return q, s


def quantize_per_token(
    x: jax.Array,
    *,
    dtype: Any = jnp.int8,
    blocks: Blocks | Mapping[str, int] | None = None,
    backend: Backend | str | None = None,
    body: Body | str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Quantize each row of ``x`` with its own scale, in one fused kernel.

    .. math::

        S_m = \\max(\\max_k |x_{mk}| \\, \\mathrm{fl}(1/q_{max}), 2^{-126}), \\quad
        q_{mk} = \\operatorname{clip}(\\operatorname{round}(x_{mk} \\, \\mathrm{fl}(1/S_m)), \\pm q_{max})

    Args:
      x: float ``(M, K)`` (bfloat16, float16 or float32).
      dtype: ``jnp.int8`` (:math:`q_{max} = 127`) or ``jnp.float8_e4m3fn`` (:math:`q_{max} = 448`).
      blocks: overrides of the block table (only ``block_m``, ``num_warps`` matter here).
      backend: ``"gpu"``, ``"tpu"``, ``"interpret"`` or ``None`` (the default device's).
      body: ``"gpu"`` (chunked rows, masked ends) or ``"tpu"`` (whole rows): which body the
        interpreter runs (tests); default: the TPU body, except on ``"gpu"``.

    Returns:
      ``(q, scale)``: ``q`` of ``dtype`` ``(M, K)`` and float32 ``scale`` ``(M, 1)``, so that
      ``q * scale`` approximates ``x``; bit for bit :func:`quantize_per_token_reference`.
    """
    return _quantize_call(_check_x(x), _format_name(dtype), blocks, backend, body)


def quantize_per_token_reference(x: jax.Array, *, dtype: Any = jnp.int8) -> tuple[jax.Array, jax.Array]:
    """The framework's own per-token quantizer: ``qjax.quantize(x, QuantSpec(dtype=...,
    granularity="per_token"))``, returned as ``(values, scale)``."""
    x = _check_x(x)
    q = quantize(x, QuantSpec(dtype=_format_name(dtype), granularity="per_token"))
    assert q.scale is not None
    return q.data, q.scale
