"""AWQ's math: activation-aware per-input-channel scales, and a per-group clipping search.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(MLSys 2024). Kernels follow the Flax convention, :math:`W_i \\in \\mathbb{R}^{K \\times N_i}`,
:math:`y_i = x W_i`, for a group of linears that read the same input :math:`x \\in \\mathbb{R}^{n
\\times K}` (q, k, v after one RMSNorm; gate and up after another). Scaling input channel :math:`k`
of the weights by :math:`s_k` and of the input by :math:`1/s_k` leaves the float function unchanged
but moves rounding error away from the channels with large activations:

.. math::

    s(\\alpha) = \\frac{m^{\\alpha}}{\\sqrt{\\max_k m_k^{\\alpha} \\cdot \\min_k m_k^{\\alpha}}},
    \\quad m_k = \\tfrac1n \\textstyle\\sum_t |x_{tk}|, \\qquad
    \\mathcal{E}(\\alpha) = \\tfrac1n \\sum_i \\big\\|x W_i - (x \\operatorname{diag}(s)^{-1})
    \\, Q(\\operatorname{diag}(s) W_i)\\big\\|_F^2,

with :math:`m^\\alpha` clamped below at :math:`10^{-4}` (as the reference implementation),
:math:`Q` the spec's round-to-nearest quantize-dequantize, and :math:`\\alpha \\in \\{0, 1/G, \\dots,
(G-1)/G\\}` for ``grid`` :math:`= G`. :math:`\\alpha = 0` gives :math:`s = 1`, plain RTN, so the
chosen :math:`\\alpha = \\arg\\min \\mathcal{E}` (first minimum) is never worse than RTN on the
calibration data. The errors are evaluated through the Gram matrix :math:`X^\\top X`:
:math:`\\|X D\\|_F^2 = \\operatorname{tr}(D^\\top X^\\top X D)`.

Folding (:func:`fold_scales`): the quantized model computes :math:`(x / s) \\, Q(\\operatorname{diag}(s)
W_i)`; :math:`x / s` is folded into whatever produces :math:`x`: the preceding RMSNorm's weight
:math:`\\gamma / s` (:math:`\\operatorname{RMSNorm}(h) \\odot \\gamma / s`), or the output columns
(and bias) of a preceding linear, :math:`W_{prev} \\operatorname{diag}(s)^{-1}`; the rows of every
:math:`W_i` are multiplied by :math:`s`. Only then is :math:`\\operatorname{diag}(s) W_i` quantized.

Clipping (:func:`awq_clip_search`, run on the already scaled weights with the scaled inputs): for
each block of the spec (a group of :math:`G` input rows of one output channel :math:`j`), the range
:math:`[lo, hi]` of the spec's calibration is shrunk by the ratio
:math:`r \\in \\{1, 1 - 1/R, \\dots\\} \\cap [1 - \\text{max\\_shrink}, 1]` (:math:`R` = ``grid``) that
minimises the block's output error :math:`\\|x_g w_{gj} - x_g Q_r(w_{gj})\\|^2`, with :math:`x_g` the
group's input columns; ties keep the larger ratio, so :math:`r = 1` (no clipping) wins unless
clipping is strictly better. Like the reference implementation, each block is optimised on its own:
the cross terms between groups of one output channel are not part of the objective (for per-channel
specs there are none and the total output error cannot grow).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.numerics import QParams, QuantSpec, quantize_dequantize, tiling
from qjax.numerics.calibration import block_range, check_finite, check_float_input
from qjax.numerics.formats import CodebookFormat
from qjax.numerics.rounding import Rounding

_HIGHEST = lax.Precision.HIGHEST
MIN_AWQ_SCALE = 1e-4  # the reference implementation's clamp of m ** alpha


class AWQResult(NamedTuple):
    """What :func:`awq_search` returns.

    Attributes:
      scales: (K,) float32 :math:`s` at the chosen :math:`\\alpha` (fold with :func:`fold_scales`).
      alpha: () the chosen exponent.
      alphas: (grid,) the exponents tried, :math:`i / G`.
      errors: (grid,) :math:`\\mathcal{E}(\\alpha)` for each (mean over tokens, summed over outputs).
      error: () :math:`\\mathcal{E}` at the chosen :math:`\\alpha`.
      rtn_error: () :math:`\\mathcal{E}(0)`, plain round-to-nearest.
    """

    scales: jax.Array
    alpha: jax.Array
    alphas: jax.Array
    errors: jax.Array
    error: jax.Array
    rtn_error: jax.Array


class ClipResult(NamedTuple):
    """What :func:`awq_clip_search` returns.

    Attributes:
      qparams: grid-shaped parameters of the clipped ranges, to pin (``QuantizedOp.weight_static``).
      ratios: grid-shaped chosen shrink ratio of each block (1.0 = no clipping).
      w_hat: the kernel quantize-dequantized with ``qparams``.
      lo, hi: grid-shaped clipped ranges the parameters come from.
      error: :math:`\\frac1n \\sum_{g, j} \\|x_g (w_{gj} - \\hat w_{gj})\\|^2` with clipping.
      unclipped_error: the same with :math:`r = 1` everywhere.
    """

    qparams: QParams
    ratios: jax.Array
    w_hat: jax.Array
    lo: jax.Array
    hi: jax.Array
    error: jax.Array
    unclipped_error: jax.Array


# -- checks ---------------------------------------------------------------------------------------


def _check_x(x: jax.Array) -> jax.Array:
    check_float_input(x, "x")
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[-1] < 1 or x.size == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; give calibration inputs of shape (n_tokens, K)")
    check_finite(x, "x")
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def _check_w(w: jax.Array, k: int, arg: str, spec: QuantSpec) -> jax.Array:
    check_float_input(w, arg)
    w = jnp.asarray(w)
    if w.ndim != 2 or w.shape[0] != k:
        raise ValueError(
            f"{arg} has shape {tuple(w.shape)} but x has K={k} input channels; "
            f"give a kernel of shape ({k}, N)"
        )
    check_finite(w, arg)
    tiling.block_shape(tuple(w.shape), spec)  # the spec must tile it (clear error otherwise)
    return w.astype(jnp.float32)


def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a qjax.QuantSpec; got {type(spec).__name__}")
    if spec.rounding == Rounding.STOCHASTIC:
        raise ValueError("AWQ compares deterministic quantizers; set rounding='nearest' (not 'stochastic')")


def _check_grid(grid: int, arg: str = "grid") -> None:
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"{arg}={grid!r} must be a positive int, e.g. 20")


# -- scale search ----------------------------------------------------------------------------------


def awq_scales(mean_abs: jax.Array, alpha: jax.Array | float) -> jax.Array:
    """:math:`s(\\alpha)` of the module docstring from :math:`m` = ``mean_abs`` (K,)."""
    s = jnp.maximum(jnp.power(mean_abs, alpha), MIN_AWQ_SCALE)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def scaled_rtn(w: jax.Array, s: jax.Array, spec: QuantSpec) -> jax.Array:
    """:math:`\\operatorname{diag}(s)^{-1} Q(\\operatorname{diag}(s) W)`: the effective kernel."""
    return quantize_dequantize(w * s[:, None], spec) / s[:, None]


def _gram_error(gram: jax.Array, d: jax.Array) -> jax.Array:
    """:math:`\\operatorname{tr}(D^\\top G D)`."""
    return jnp.sum(jnp.matmul(gram, d, precision=_HIGHEST) * d)


@functools.partial(jax.jit, static_argnames=("spec", "grid"))
def _search(x: jax.Array, ws: tuple[jax.Array, ...], spec: QuantSpec, grid: int) -> AWQResult:
    n = x.shape[0]
    gram = jnp.matmul(x.T, x, precision=_HIGHEST)  # (K, K)
    mean_abs = jnp.mean(jnp.abs(x), axis=0)
    alphas = jnp.arange(grid, dtype=jnp.float32) / grid

    def error(alpha: jax.Array) -> jax.Array:
        s = awq_scales(mean_abs, alpha)
        total = sum(_gram_error(gram, w - scaled_rtn(w, s, spec)) for w in ws)
        return jnp.asarray(total) / n

    errors = lax.map(error, alphas)
    best = jnp.argmin(errors)  # the first minimum: alpha = 0 wins ties
    alpha = alphas[best]
    return AWQResult(awq_scales(mean_abs, alpha), alpha, alphas, errors, errors[best], errors[0])


def awq_search(x: jax.Array, ws: Sequence[jax.Array], spec: QuantSpec, *, grid: int = 20) -> AWQResult:
    """Grid search of AWQ's per-input-channel scales for kernels ``ws`` that share the input ``x``.

    Args:
      x: calibration inputs (..., K) of the linears (after the norm), leading axes = tokens.
      ws: the kernels (K, N_i), e.g. ``[w_q, w_k, w_v]``.
      spec: the weight quantizer, e.g. int4/int3 ``per_group`` along ``axis=0`` with ``group_size=128``.
      grid: number of exponents :math:`\\alpha = i / \\text{grid}`, ``i = 0..grid-1``.
    """
    _check_spec(spec)
    _check_grid(grid)
    x2 = _check_x(x)
    if isinstance(ws, jax.Array | np.ndarray) or len(ws) == 0:
        raise ValueError("ws must be a non-empty list of kernels (K, N_i), e.g. [w_q, w_k, w_v]")
    k = x2.shape[1]
    kernels = tuple(_check_w(w, k, f"ws[{i}]", spec) for i, w in enumerate(ws))
    return _search(x2, kernels, spec, grid)


def fold_scales(prev: jax.Array, ws: Sequence[jax.Array], s: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Fold AWQ scales: ``(prev / s, [diag(s) W_i])``, the float function unchanged.

    ``prev`` (..., K): what produces the input along its last axis: the RMSNorm weight (K,), or a
    preceding linear's kernel (K_prev, K) (and, separately, its bias (K,)).
    """
    s = jnp.asarray(s)
    prev = jnp.asarray(prev)
    k = s.shape[0] if s.ndim == 1 else -1
    if s.ndim != 1 or prev.ndim < 1 or prev.shape[-1] != k:
        raise ValueError(
            f"s has shape {tuple(s.shape)} and prev {tuple(prev.shape)}; need s (K,) and prev (..., K) "
            "with the same K (prev's last axis produces the inputs that s scales)"
        )
    for i, w in enumerate(ws):
        if jnp.ndim(w) != 2 or jnp.shape(w)[0] != k:
            raise ValueError(f"ws[{i}] has shape {tuple(jnp.shape(w))}; need a kernel ({k}, N)")
    s_prev = s.astype(prev.dtype).reshape((1,) * (prev.ndim - 1) + (k,))
    return prev / s_prev, [jnp.asarray(w) * s[:, None].astype(jnp.result_type(w)) for w in ws]


# -- clipping search -------------------------------------------------------------------------------


def _clip_rows(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """Input rows per block (G for per-group, K for per-channel); errors for other specs."""
    if isinstance(spec.format, CodebookFormat):
        raise ValueError(
            f"dtype={spec.dtype!r} is a k-means codebook: it has no range to clip; use an int format"
        )
    block = tiling.block_shape(shape, spec)
    if block[1] != 1:
        raise ValueError(
            "the clip search shrinks the range of each output channel's block of input rows; "
            f"granularity={str(spec.granularity)!r} with axis={spec.axis!r} gives blocks {block} of a "
            f"{shape} kernel: use 'per_group' with axis=0 or 'per_channel' with axis=-1"
        )
    return block[0]


@functools.partial(jax.jit, static_argnames=("spec", "rows"))
def _clip(x: jax.Array, w: jax.Array, ratios: jax.Array, spec: QuantSpec, rows: int) -> ClipResult:
    (n, k), out = x.shape, w.shape[1]
    fmt = spec.affine_format
    xb = x.reshape(n, k // rows, rows)
    gram = jnp.einsum("tga,tgb->gab", xb, xb, precision=_HIGHEST)  # (K/G, G, G) diagonal blocks
    lo, hi = block_range(w, spec, (rows, 1))  # (K/G, N)

    def block_errors(r: jax.Array) -> jax.Array:  # (K/G, N)
        qp = fmt.qparams(r * lo, r * hi, spec.symmetric)
        d = (w - quantize_dequantize(w, spec, qparams=qp)).reshape(k // rows, rows, out)
        return jnp.sum(jnp.matmul(gram, d, precision=_HIGHEST) * d, axis=1)

    def step(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        best_err, best_r = carry
        err = block_errors(ratios[i])
        better = err < best_err  # strict: ties keep the larger ratio
        return jnp.where(better, err, best_err), jnp.where(better, ratios[i], best_r)

    unclipped = block_errors(ratios[0])
    best_err, best_r = lax.fori_loop(1, ratios.shape[0], step, (unclipped, jnp.ones_like(unclipped)))
    lo, hi = best_r * lo, best_r * hi
    qp = fmt.qparams(lo, hi, spec.symmetric)
    w_hat = quantize_dequantize(w, spec, qparams=qp)
    return ClipResult(qp, best_r, w_hat, lo, hi, jnp.sum(best_err) / n, jnp.sum(unclipped) / n)


def clip_ratios(grid: int, max_shrink: float) -> np.ndarray:
    """The ratios tried: :math:`1 - i / \\text{grid}`, :math:`i = 0 .. \\lfloor \\text{max\\_shrink}
    \\cdot \\text{grid} \\rfloor`."""
    steps = int(np.floor(max_shrink * grid + 1e-9))
    return (1.0 - np.arange(steps + 1, dtype=np.float64) / grid).astype(np.float32)


def awq_clip_search(
    x: jax.Array, w: jax.Array, spec: QuantSpec, *, grid: int = 20, max_shrink: float = 0.5
) -> ClipResult:
    """AWQ's clipping search (module docstring): per block, the shrink ratio of its range with the
    least output error on ``x``. Run it on the scaled kernel :math:`\\operatorname{diag}(s) W` with the
    scaled inputs :math:`x / s` when combined with :func:`awq_search`.

    Args:
      x: calibration inputs (..., K).
      w: the kernel (K, N).
      spec: ``per_group`` along ``axis=0`` or ``per_channel`` along ``axis=-1``, an affine format.
      grid: ratios step by ``1 / grid``.
      max_shrink: the smallest ratio tried is ``1 - max_shrink``, in [0, 1).
    """
    _check_spec(spec)
    _check_grid(grid)
    if not (isinstance(max_shrink, int | float) and 0.0 <= max_shrink < 1.0):
        raise ValueError(f"max_shrink={max_shrink!r} must be in [0, 1), e.g. 0.5 (ratios down to 0.5)")
    x2 = _check_x(x)
    w2 = _check_w(w, x2.shape[1], "w", spec)
    rows = _clip_rows(spec, tuple(w2.shape))
    return _clip(x2, w2, jnp.asarray(clip_ratios(grid, max_shrink)), spec, rows)


__all__ = [
    "MIN_AWQ_SCALE",
    "AWQResult",
    "ClipResult",
    "awq_clip_search",
    "awq_scales",
    "awq_search",
    "clip_ratios",
    "fold_scales",
    "scaled_rtn",
]
