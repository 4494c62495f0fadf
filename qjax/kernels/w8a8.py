"""W8A8: int8 activations times int8 weights, int32 accumulation, a float32 epilogue in the kernel.

.. math::

    y_{mn} = s^x_m \\, s^w_n \\Big(\\sum_k q^x_{mk} q^w_{kn} - z^x_m \\sum_k q^w_{kn}\\Big) + b_n

with :math:`q^x` int8 activations (per-token or per-tensor scale :math:`s^x`, optional zero point
:math:`z^x`), :math:`q^w` symmetric int8 weights ``(K, N)`` with one scale per output channel
:math:`s^w` and an optional bias :math:`b`. The sum over :math:`k` is exact (int32), so the kernel
equals its reference up to the float32 rounding of the epilogue. The bodies and grid are those of
:mod:`qjax.kernels.scaled`.
"""

from __future__ import annotations

from typing import Any, Unpack

import jax
import jax.numpy as jnp
from jax import lax

from qjax.kernels.common import (
    KN,
    X_DOC,
    ScaledFormat,
    WeightLayout,
    check_contraction,
    check_operand,
    check_scaled_operands,
    epilogue,
)
from qjax.kernels.launch import LaunchOptions
from qjax.kernels.scaled import scaled_matmul

INT8 = ScaledFormat(
    jnp.int8,
    x_hint="quantize activations first, e.g. quantize_per_token(x)",
    w_hint="quantize weights to symmetric int8 per output channel",
    w_scale_doc="(1, N) per output channel",
)


def check_w8a8(
    x_q: Any,
    x_scale: Any,
    w_q: Any,
    w_scale: Any,
    *,
    x_zero_point: Any = None,
    layout: WeightLayout = KN,
    **kw: Any,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jnp.dtype]:
    """The operands of :func:`w8a8_matmul` checked (``bias``, ``out_dtype`` in ``kw``: see
    :func:`~qjax.kernels.common.check_scaled_operands`), with the epilogue operands (the weight's
    column sums when there is a zero point) and the out dtype."""
    x_q, w_q, epi, dt = check_scaled_operands(x_q, x_scale, w_q, w_scale, INT8, layout=layout, **kw)
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
        epi["colsum"] = jnp.sum(w_q.astype(jnp.int32), axis=layout.k_axis).reshape(1, -1)  # (1, N)
    return x_q, w_q, epi, dt


def check_int8(x_q: Any, w_q: Any, layout: WeightLayout = KN) -> tuple[jax.Array, jax.Array]:
    """The operands of :func:`int8_matmul` checked."""
    hint = "convert with {}.astype(jnp.int8) if in range"
    x_q = check_operand(x_q, "x_q", jnp.int8, X_DOC, hint.format("x_q"))
    w_q = check_operand(w_q, "w_q", jnp.int8, f"of shape {layout.shape_doc}", hint.format("w_q"))
    check_contraction(x_q, w_q, "x_q", "w_q", layout)
    return x_q, w_q


def w8a8_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    x_zero_point: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
    **launch: Unpack[LaunchOptions],
) -> jax.Array:
    """Int8 x int8 matmul with int32 accumulation and a fused float32 epilogue.

    .. math::

        y_{mn} = s^x_m s^w_n \\Big(\\sum_k q^x_{mk} q^w_{kn} - z^x_m \\sum_k q^w_{kn}\\Big) + b_n

    Args:
      x_q: int8 ``(M, K)`` activations.
      x_scale: float32 ``(M, 1)`` (per token) or ``(1, 1)`` (per tensor).
      w_q: int8 ``(K, N)`` weights, symmetric per output channel.
      w_scale: float32 ``(1, N)`` (or ``(1, 1)``).
      x_zero_point: int32 of ``x_scale``'s shape (asymmetric activations) or ``None``; the
        correction uses the column sums of ``w_q``, computed once per call outside the kernel.
      bias: float ``(N,)`` or ``None``.
      out_dtype: float32, bfloat16 or float16.
      **launch: ``blocks``, ``backend``, ``split_k``, ``body``
        (:class:`~qjax.kernels.launch.LaunchOptions`). With K split over programs of the GPU body
        their int32 partial sums are added and the epilogue applied by XLA (exact: the same result).

    Returns:
      ``(M, N)`` of ``out_dtype``.
    """
    kw: dict[str, Any] = dict(x_zero_point=x_zero_point, bias=bias, out_dtype=out_dtype)
    x_q, w_q, epi, dt = check_w8a8(x_q, x_scale, w_q, w_scale, **kw)
    return scaled_matmul(x_q, w_q, epi, kernel="w8a8", acc_dtype=jnp.int32, out_dtype=dt, **launch)


def w8a8_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    x_zero_point: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.bfloat16,
) -> jax.Array:
    """:func:`w8a8_matmul` in plain ``jax.numpy`` (XLA's int32 dot, the same float32 epilogue)."""
    kw: dict[str, Any] = dict(x_zero_point=x_zero_point, bias=bias, out_dtype=out_dtype)
    x_q, w_q, epi, dt = check_w8a8(x_q, x_scale, w_q, w_scale, **kw)
    return epilogue(int8_matmul_reference(x_q, w_q), epi, dt)


def int8_matmul(x_q: jax.Array, w_q: jax.Array, **launch: Unpack[LaunchOptions]) -> jax.Array:
    """The raw int32 accumulator :math:`\\sum_k q^x_{mk} q^w_{kn}` of int8 ``(M, K)`` and ``(K, N)``:
    the :func:`w8a8_matmul` kernel without its epilogue (``launch`` as there)."""
    x_q, w_q = check_int8(x_q, w_q)
    return scaled_matmul(x_q, w_q, {}, kernel="w8a8", acc_dtype=jnp.int32, out_dtype=jnp.int32, **launch)


def int8_matmul_reference(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
    """``x_q @ w_q`` in int32 by XLA (exact)."""
    x_q, w_q = check_int8(x_q, w_q)
    return lax.dot_general(x_q, w_q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
