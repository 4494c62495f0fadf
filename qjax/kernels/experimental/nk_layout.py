"""Experimental: the 8-bit kernels with the weight stored ``(N, K)``, K contiguous.

Hopper's 8-bit ``wgmma`` reads both operands K-major from shared memory; for a ``(K, N)`` 8-bit
operand Triton emits the older ``mma.sync`` instead (fp8 through fp16). Stored ``(N, K)`` (``w.T``,
once, outside the hot path) the weight enters each dot transposed, ``x @ w_slice.T`` (``dot_general``
contracting both operands' last axes: ``tt.dot(x, tt.trans(w))``). :data:`NK` is that
:class:`~qjax.kernels.common.WeightLayout`; the ``*_nk`` functions are the main W8A8, int8, FP8 and
block-scaled FP8 kernels and references with it, the same arguments and results (weight and its
scales aside: ``w_scale`` keeps its shape). Status: ``docs/benchmarks/kernels_status.md``.
"""

from __future__ import annotations

from typing import Any, Unpack

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qjax.kernels import xla
from qjax.kernels.common import WeightLayout
from qjax.kernels.fp8 import check_fp8, fp8_matmul_reference, scaled_fp8
from qjax.kernels.fp8_block import check_fp8_block, fp8_block_matmul_reference, launch_fp8_block
from qjax.kernels.launch import LaunchOptions, split_launch_options
from qjax.kernels.scaled import scaled_matmul
from qjax.kernels.w8a8 import check_int8, check_w8a8, int8_matmul_reference, w8a8_matmul_reference
from qjax.numerics import QArray
from qjax.numerics.formats import IntFormat

_NT = (((1,), (1,)), ((), ()))  # dot_general of x (M, K) and w (N, K): contract both last axes


class NKLayout(WeightLayout):
    """The weight ``(N, K)``, K contiguous."""

    n_axis = 0
    shape_doc = "(N, K)"
    fix = "a weight stored (K, N) takes the main kernels of qjax.kernels"

    def gpu_spec(self, kp: int, block_n: int) -> Any:
        return pl.BlockSpec((block_n, kp), lambda i, j, s: (j, 0))

    def tpu_spec(self, block_k: int, block_n: int) -> Any:
        return pl.BlockSpec((block_n, block_k), lambda i, j, k: (j, k))

    def k_slice(self, w_ref: Any, start: Any, size: int) -> jax.Array:
        return w_ref[:, pl.ds(start, size)]  # (block_n, size)

    def dot(self, x: jax.Array, w: jax.Array, acc_dtype: Any) -> jax.Array:
        return lax.dot_general(x, w, _NT, preferred_element_type=acc_dtype)

    def as_kn(self, w: jax.Array) -> jax.Array:
        return w.T


NK = NKLayout()


def prepare_nk(w: QArray) -> jax.Array | None:
    """The ``(N, K)`` copy of a served 2-D 8-bit weight that the ``*_nk`` kernels read (symmetric
    int8 for W8A8, e4m3 for FP8 and block-scaled FP8); ``None`` for other weights."""
    if len(w.shape) != 2:
        return None
    fw = w.spec.format
    if isinstance(fw, IntFormat) and fw.bits == 8 and fw.signed and w.zero_point is None:
        return jnp.transpose(xla.operand(w).values)
    if w.data.dtype == jnp.dtype(jnp.float8_e4m3fn):
        return jnp.transpose(w.data)
    return None


def w8a8_matmul_nk(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, **kw: Any
) -> jax.Array:
    """:func:`qjax.kernels.w8a8.w8a8_matmul` (the same keyword arguments) with ``w_q`` int8 ``(N, K)``."""
    epilogue, launch = split_launch_options(kw)
    x_q, w_q, epi, dt = check_w8a8(x_q, x_scale, w_q, w_scale, layout=NK, **epilogue)
    return scaled_matmul(x_q, w_q, epi, kernel="w8a8", acc_dtype=jnp.int32, out_dtype=dt, layout=NK, **launch)


def w8a8_matmul_nk_reference(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, **kw: Any
) -> jax.Array:
    """:func:`qjax.kernels.w8a8.w8a8_matmul_reference` with ``w_q`` ``(N, K)``."""
    check_w8a8(x_q, x_scale, w_q, w_scale, layout=NK, **kw)
    return w8a8_matmul_reference(x_q, x_scale, NK.as_kn(w_q), w_scale, **kw)


def int8_matmul_nk(x_q: jax.Array, w_q: jax.Array, **launch: Unpack[LaunchOptions]) -> jax.Array:
    """:func:`qjax.kernels.w8a8.int8_matmul` with ``w_q`` int8 ``(N, K)``."""
    x_q, w_q = check_int8(x_q, w_q, NK)
    return scaled_matmul(
        x_q, w_q, {}, kernel="w8a8", acc_dtype=jnp.int32, out_dtype=jnp.int32, layout=NK, **launch
    )


def int8_matmul_nk_reference(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
    """``x_q @ w_q.T`` of int8 ``(M, K)`` and ``(N, K)`` in int32 by XLA (exact)."""
    x_q, w_q = check_int8(x_q, w_q, NK)
    return int8_matmul_reference(x_q, NK.as_kn(w_q))


def fp8_matmul_nk(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, **kw: Any
) -> jax.Array:
    """:func:`qjax.kernels.fp8.fp8_matmul` (the same keyword arguments) with ``w_q`` e4m3 ``(N, K)``."""
    epilogue, launch = split_launch_options(kw)
    x_q, w_q, epi, dt = check_fp8(x_q, x_scale, w_q, w_scale, layout=NK, **epilogue)
    return scaled_fp8(x_q, w_q, epi, dt, layout=NK, **launch)


def fp8_matmul_nk_reference(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, **kw: Any
) -> jax.Array:
    """:func:`qjax.kernels.fp8.fp8_matmul_reference` with ``w_q`` ``(N, K)``."""
    check_fp8(x_q, x_scale, w_q, w_scale, layout=NK, **kw)
    return fp8_matmul_reference(x_q, x_scale, NK.as_kn(w_q), w_scale, **kw)


def fp8_block_matmul_nk(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, **kw: Any
) -> jax.Array:
    """:func:`qjax.kernels.fp8_block.fp8_block_matmul` (the same keyword arguments) with ``w_q`` e4m3
    ``(N, K)`` (``w_scale`` ``(ceil(K/128), ceil(N/128))`` as there)."""
    epilogue, launch = split_launch_options(kw)
    operands = check_fp8_block(x_q, x_scale, w_q, w_scale, layout=NK, **epilogue)
    return launch_fp8_block(*operands, layout=NK, **launch)


def fp8_block_matmul_nk_reference(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, **kw: Any
) -> jax.Array:
    """:func:`qjax.kernels.fp8_block.fp8_block_matmul_reference` with ``w_q`` ``(N, K)``."""
    check_fp8_block(x_q, x_scale, w_q, w_scale, layout=NK, **kw)
    return fp8_block_matmul_reference(x_q, x_scale, NK.as_kn(w_q), w_scale, **kw)
