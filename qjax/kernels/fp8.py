"""FP8: e4m3 activations times e4m3 weights, float32 accumulation, a float32 epilogue in the kernel.

.. math::

    y_{mn} = s^x_m \\, s^w_n \\sum_k q^x_{mk} q^w_{kn} + b_n

with :math:`q^x, q^w` float8_e4m3fn, :math:`s^x` per token ``(M, 1)`` or per tensor ``(1, 1)``,
:math:`s^w` per output channel ``(1, N)`` or per tensor ``(1, 1)``. Every product of two e4m3
values is exact in float32 (4-bit significands); the sums round in float32. The bodies and grid are
those of :mod:`qjax.kernels.scaled`: on GPU the e4m3 tiles go to the dot as they are (fp8 tensor
cores, sm_89+); on TPU each tile is upcast to bfloat16 before the dot (exact: bf16 holds every e4m3
value), the HBM traffic still fp8.
"""

from __future__ import annotations

from typing import Any, Unpack

import jax
import jax.numpy as jnp
from jax import lax

from qjax.kernels.common import E4M3, ScaledFormat, check_scaled_operands, epilogue
from qjax.kernels.launch import LaunchOptions
from qjax.kernels.scaled import scaled_matmul

E4M3_FORMAT = ScaledFormat(
    E4M3,
    x_hint="quantize first, e.g. quantize_per_token(x, dtype=jnp.float8_e4m3fn)",
    w_hint="quantize weights to float8_e4m3fn",
    w_scale_doc="(1, N) per channel or (1, 1) per tensor",
)


def check_fp8(
    x_q: Any, x_scale: Any, w_q: Any, w_scale: Any, **kw: Any
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jnp.dtype]:
    """The operands of :func:`fp8_matmul` checked (keywords ``bias``, ``out_dtype``, ``layout``:
    :func:`~qjax.kernels.common.check_scaled_operands`), with the epilogue operands and the out dtype."""
    return check_scaled_operands(x_q, x_scale, w_q, w_scale, E4M3_FORMAT, **kw)


def fp8_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
    **launch: Unpack[LaunchOptions],
) -> jax.Array:
    """E4M3 x E4M3 matmul with float32 accumulation and a fused float32 epilogue.

    .. math::

        y_{mn} = s^x_m s^w_n \\sum_k q^x_{mk} q^w_{kn} + b_n

    Args:
      x_q: float8_e4m3fn ``(M, K)``.
      x_scale: float32 ``(M, 1)`` or ``(1, 1)``.
      w_q: float8_e4m3fn ``(K, N)``.
      w_scale: float32 ``(1, N)`` or ``(1, 1)``.
      bias: float ``(N,)`` or ``None``.
      out_dtype: float32, bfloat16 or float16.
      **launch: ``blocks``, ``backend``, ``split_k``, ``body``
        (:class:`~qjax.kernels.launch.LaunchOptions`). With K split over programs of the GPU body
        their float32 partial sums are added and the epilogue applied by XLA (the sums round in
        another order).
    """
    x_q, w_q, epi, dt = check_fp8(x_q, x_scale, w_q, w_scale, bias=bias, out_dtype=out_dtype)
    return scaled_fp8(x_q, w_q, epi, dt, **launch)


def scaled_fp8(
    x_q: jax.Array, w_q: jax.Array, epi: dict[str, jax.Array], dt: Any, **launch: Any
) -> jax.Array:
    """The FP8 kernel on operands checked by :func:`check_fp8` (``launch``: launch options and the
    weight's ``layout``): float32 accumulation, tiles upcast to bfloat16 on TPU."""
    kw: dict[str, Any] = dict(acc_dtype=jnp.float32, out_dtype=dt, tpu_operand_dtype=jnp.bfloat16)
    return scaled_matmul(x_q, w_q, epi, kernel="fp8", **kw, **launch)


def fp8_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
) -> jax.Array:
    """:func:`fp8_matmul` in plain ``jax.numpy``: the operands upcast to float32 (exact), a float32
    dot at full precision, the same epilogue."""
    x_q, w_q, epi, dt = check_fp8(x_q, x_scale, w_q, w_scale, bias=bias, out_dtype=out_dtype)
    acc = lax.dot_general(
        x_q.astype(jnp.float32),
        w_q.astype(jnp.float32),
        (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return epilogue(acc, epi, dt)
