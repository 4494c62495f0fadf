"""FP8: e4m3 activations times e4m3 weights, float32 accumulation, a float32 epilogue in the kernel.

.. math::

    y_{mn} = s^x_m \\, s^w_n \\sum_k q^x_{mk} q^w_{kn} + b_n

with :math:`q^x, q^w` float8_e4m3fn, :math:`s^x` per token ``(M, 1)`` or per tensor ``(1, 1)``,
:math:`s^w` per output channel ``(1, N)`` or per tensor ``(1, 1)``. Every product of two e4m3
values is exact in float32 (4-bit significands); the sums round in float32.

Backends (same driver and bodies as :mod:`qjax.kernels.w8a8`):

* **GPU** (Triton): the e4m3 tiles go to ``tt.dot`` as they are, with a float32 accumulator: the
  fp8 tensor-core instructions on sm_89+ (Ada, Hopper). Older GPUs cannot run it.
* **TPU** (Mosaic): each tile is upcast to bfloat16 in VMEM before the dot (exact: bf16 holds every
  e4m3 value), since only the newest TPU generations have fp8 matrix units; the arithmetic is the
  same, the HBM traffic still fp8.
* **Interpret**: the GPU body (fp8 dot by XLA on the host).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qjax.kernels import blocks as kb
from qjax.kernels.w8a8 import _as_kn, _epilogue, _scaled_matmul, check_scaled_operands

FP8 = jnp.float8_e4m3fn


def _check_fp8(
    x_q: Any, x_scale: Any, w_q: Any, w_scale: Any, bias: Any, out_dtype: Any, w_layout: str = "kn"
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jnp.dtype]:
    return check_scaled_operands(
        x_q,
        x_scale,
        w_q,
        w_scale,
        bias,
        out_dtype,
        dtype=FP8,
        x_hint="quantize first, e.g. quantize_per_token(x, dtype=jnp.float8_e4m3fn)",
        w_hint="quantize weights to float8_e4m3fn",
        w_scale_doc="(1, N) per channel or (1, 1) per tensor",
        w_layout=w_layout,
    )


def fp8_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
    blocks: kb.Blocks | Mapping[str, Any] | Any | None = None,
    backend: str | None = None,
    w_layout: str = "kn",
    split_k: int | None = None,
) -> jax.Array:
    """E4M3 x E4M3 matmul with float32 accumulation and a fused float32 epilogue.

    .. math::

        y_{mn} = s^x_m s^w_n \\sum_k q^x_{mk} q^w_{kn} + b_n

    Args:
      x_q: float8_e4m3fn ``(M, K)``.
      x_scale: float32 ``(M, 1)`` or ``(1, 1)``.
      w_q: float8_e4m3fn ``(K, N)`` (``(N, K)`` with ``w_layout="nk"``).
      w_scale: float32 ``(1, N)`` or ``(1, 1)``.
      bias: float ``(N,)`` or ``None``.
      out_dtype: float32, bfloat16 or float16.
      blocks: overrides of the block table.
      backend: ``"gpu"``, ``"tpu"``, ``"interpret"``, ``"mosaic_gpu"`` (the Hopper path,
        :mod:`qjax.kernels.hopper`; ``blocks`` then a :class:`~qjax.kernels.hopper.HopperConfig`
        or a mapping of its fields) or ``None`` (the default device's).
      w_layout: ``"kn"`` or ``"nk"`` (``w_q`` stored ``(N, K)``, K contiguous: what Hopper's fp8
        tensor cores read; see :mod:`qjax.kernels.w8a8`).
      split_k: K ranges run by separate programs of the GPU body, their float32 partial sums added
        and the epilogue applied by XLA (the sums round in another order); ``None``: on ``"gpu"``
        enough ranges to fill the GPU when the (M, N) grid is small (decode), else one.
    """
    x_q, w_q, epi, dt = _check_fp8(x_q, x_scale, w_q, w_scale, bias, out_dtype, w_layout)
    return _scaled_matmul(
        x_q,
        w_q,
        epi,
        kernel="fp8",
        acc_dtype=jnp.float32,
        out_dtype=dt,
        blocks=blocks,
        backend=backend,
        tpu_operand_dtype=jnp.bfloat16,
        w_layout=w_layout,
        split_k=split_k,
    )


def fp8_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
    w_layout: str = "kn",
) -> jax.Array:
    """:func:`fp8_matmul` in plain ``jax.numpy``: the operands upcast to float32 (exact), a float32
    dot at full precision, the same epilogue."""
    x_q, w_q, epi, dt = _check_fp8(x_q, x_scale, w_q, w_scale, bias, out_dtype, w_layout)
    acc = lax.dot_general(
        x_q.astype(jnp.float32),
        _as_kn(w_q, w_layout).astype(jnp.float32),
        (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return _epilogue(acc, epi, dt)
