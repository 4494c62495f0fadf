"""What the matmul kernels share: operand checks, padding, the weight's layout and the epilogue.

**Checks** run at trace time and name the argument, the bad value and the fix.

**Padding.** Shapes that are not multiples of the blocks are zero-padded (:func:`pad_axis`) and the
output sliced back: zeros add nothing to a contraction. Weights are padded once where a kernel
prepares them, so that a call pads only the activations, if at all.

**Weight layout.** The main kernels read the weight ``(K, N)`` (:data:`KN`). A
:class:`WeightLayout` says how a kernel body reads its weight: the block of a GPU program (all of K
for a column block), the block of a TPU step, a K slice of a block, and the dot with an activation
slice; an experimental layout (``qjax.kernels.experimental.nk_layout``) plugs in here.

**Epilogue** of the scaled matmuls (W8A8, FP8):

.. math::

    y_{mn} = s^x_m s^w_n \\Big(\\mathrm{acc}_{mn} - z^x_m \\sum_k q^w_{kn}\\Big) + b_n

in int32 for the zero-point term, then float32; operands keyed by :data:`EPILOGUE_ORDER`, row
operands ``(M, 1)`` or ``(1, 1)``, column operands ``(1, N)`` or ``(1, 1)``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qjax.kernels.backend import Backend
from qjax.kernels.tuning import Blocks, choose_blocks

E4M3 = jnp.float8_e4m3fn
EPILOGUE_ORDER = ("x_scale", "w_scale", "x_zp", "colsum", "bias")
ROW_OPERANDS = ("x_scale", "x_zp")  # (M, 1): indexed by the row block; the others (1, N)
X_DOC = "of shape (M, K)"

# ------------------------------------------------------------------------------------------------
# Padding


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, multiple: int, value: Any = 0) -> jax.Array:
    """``x`` zero-padded (or ``value``-padded) at the end of ``axis`` to a multiple of ``multiple``."""
    size = x.shape[axis]
    extra = round_up(size, multiple) - size
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


# ------------------------------------------------------------------------------------------------
# Weight layout


class WeightLayout(abc.ABC):
    """How a kernel stores and reads its 2-D weight. ``n_axis`` / ``k_axis``: the weight's axes of
    N and K; ``shape_doc``: the shape, for messages; ``fix``: what to do with a weight stored the
    other way."""

    n_axis: int
    shape_doc: str
    fix: str

    @property
    def k_axis(self) -> int:
        return 1 - self.n_axis

    def pad(self, w: jax.Array, block_n: int, block_k: int) -> jax.Array:
        """``w`` padded to whole blocks of N and K."""
        return pad_axis(pad_axis(w, self.n_axis, block_n), self.k_axis, block_k)

    @abc.abstractmethod
    def gpu_spec(self, kp: int, block_n: int) -> Any:
        """The weight's block at grid point ``(i, j, s)`` of a GPU body: all ``kp`` (padded K) rows
        of column block ``j`` (a K range picks its steps inside the block)."""

    @abc.abstractmethod
    def tpu_spec(self, block_k: int, block_n: int) -> Any:
        """The weight's block at grid point ``(i, j, k)`` of a TPU body: K block ``k``, columns ``j``."""

    @abc.abstractmethod
    def k_slice(self, w_ref: Any, start: Any, size: int) -> jax.Array:
        """Rows ``start .. start + size`` of K of a GPU body's weight block."""

    @abc.abstractmethod
    def dot(self, x: jax.Array, w: jax.Array, acc_dtype: Any) -> jax.Array:
        """``x (bm, bk)`` times the weight tile read by :meth:`k_slice` (or a TPU block): ``(bm, bn)``."""

    @abc.abstractmethod
    def as_kn(self, w: jax.Array) -> jax.Array:
        """The weight ``(K, N)`` (the references compute in one layout)."""


class KNLayout(WeightLayout):
    """The weight ``(K, N)``, N contiguous: what the main kernels take."""

    n_axis = 1
    shape_doc = "(K, N)"
    fix = "a weight stored (N, K) takes the *_nk entries of qjax.kernels.experimental"

    def gpu_spec(self, kp: int, block_n: int) -> Any:
        return pl.BlockSpec((kp, block_n), lambda i, j, s: (0, j))

    def tpu_spec(self, block_k: int, block_n: int) -> Any:
        return pl.BlockSpec((block_k, block_n), lambda i, j, k: (k, j))

    def k_slice(self, w_ref: Any, start: Any, size: int) -> jax.Array:
        return w_ref[pl.ds(start, size), :]  # (size, block_n)

    def dot(self, x: jax.Array, w: jax.Array, acc_dtype: Any) -> jax.Array:
        return jnp.dot(x, w, preferred_element_type=acc_dtype)

    def as_kn(self, w: jax.Array) -> jax.Array:
        return w


KN = KNLayout()


# ------------------------------------------------------------------------------------------------
# Checks


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


def check_contraction(
    x: jax.Array, w: jax.Array, x_name: str, w_name: str, layout: WeightLayout = KN
) -> None:
    """``x`` ``(M, K)`` and ``w`` in ``layout`` agree on K."""
    k_w, axis = w.shape[layout.k_axis], ("rows", "columns")[layout.k_axis]
    if x.shape[1] != k_w:
        raise ValueError(
            f"{x_name} has K={x.shape[1]} columns but {w_name} has {k_w} {axis} "
            f"(shapes {tuple(x.shape)} and {tuple(w.shape)}); {w_name} must be {layout.shape_doc}: "
            f"transpose it ({layout.fix})"
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
    """A float ``(N,)`` bias as float32 ``(1, N)``, or None."""
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


def check_blocks(
    kernel: str, backend: Backend, m: int, blocks: Blocks | Mapping[str, int] | None, operand_bits: int
) -> Blocks:
    """Blocks for this call, checked against what the backend can tile."""
    b = choose_blocks(kernel, backend, m, blocks)
    if backend == Backend.GPU:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(b, name)
            if v < 16 or v & (v - 1):
                raise ValueError(
                    f"blocks.{name}={v}: Triton needs every dot dimension to be a power of two >= 16"
                )
    elif backend == Backend.TPU:
        sub = 32 if operand_bits == 8 else 8
        if b.block_m % sub or b.block_n % 128 or b.block_k % 128:
            raise ValueError(
                f"blocks={b}: Mosaic tiles need block_m a multiple of {sub} and block_n, block_k "
                "multiples of 128"
            )
    return b


class ScaledFormat(NamedTuple):
    """The operand format of a scaled matmul (W8A8, FP8), for its checks: the operands' ``dtype``
    and the fixes the errors name."""

    dtype: Any
    x_hint: str
    w_hint: str
    w_scale_doc: str


def check_scaled_operands(
    x_q: Any,
    x_scale: Any,
    w_q: Any,
    w_scale: Any,
    fmt: ScaledFormat,
    *,
    bias: Any = None,
    out_dtype: Any = jnp.bfloat16,
    layout: WeightLayout = KN,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jnp.dtype]:
    """The operands of a scaled matmul checked: ``x_q`` ``(M, K)`` and ``w_q`` in ``layout`` of
    ``fmt.dtype``, ``x_scale`` per token or per tensor, ``w_scale`` per column or per tensor,
    ``bias`` ``(N,)`` or None; returns them with the epilogue operands and the out dtype."""
    x_q = check_operand(x_q, "x_q", fmt.dtype, X_DOC, fmt.x_hint)
    w_q = check_operand(w_q, "w_q", fmt.dtype, f"of shape {layout.shape_doc}", fmt.w_hint)
    check_contraction(x_q, w_q, "x_q", "w_q", layout)
    m, n = x_q.shape[0], w_q.shape[layout.n_axis]
    epi = {
        "x_scale": check_scale(x_scale, "x_scale", ((m, 1), (1, 1)), "(M, 1) per token or (1, 1) per tensor"),
        "w_scale": check_scale(w_scale, "w_scale", ((1, n), (1, 1)), fmt.w_scale_doc),
    }
    b = check_bias(bias, n)
    if b is not None:
        epi["bias"] = b
    return x_q, w_q, epi, check_out_dtype(out_dtype)


# ------------------------------------------------------------------------------------------------
# Epilogue


def epilogue(acc: jax.Array, epi: Mapping[str, jax.Array], out_dtype: Any) -> jax.Array:
    """acc (block_m, block_n) -> output tile: the zero-point correction (int32), the scales and the
    bias (float32), the cast; the same arithmetic in the same order in kernels and references.
    Without scales the accumulator gets the bias (if any) in its own type."""
    if "x_zp" in epi:
        acc = acc - epi["x_zp"] * epi["colsum"]  # int32: (bm, 1) * (1, bn)
    y = acc
    if "x_scale" in epi:
        y = acc.astype(jnp.float32) * epi["x_scale"] * epi["w_scale"]  # (bm, bn) * (bm, 1) * (1, bn)
    if "bias" in epi:
        y = y + epi["bias"]  # (1, bn)
    return y.astype(out_dtype)
