"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 matmul with a float path for outlier features.

For :math:`X` of shape ``(T, K)`` (every leading axis flattened into tokens) and a kernel
:math:`W` of shape ``(K, N)`` (Flax layout, :math:`Y = X W`), the outlier features are the input
channels with a large value anywhere in the call:

.. math::

    O = \\{\\, j : \\max_t |X_{tj}| \\ge \\tau \\,\\}, \\qquad
    Y = X_{:,O}\\, W_{O,:} + S^X S^W \\odot \\big(Q(X_{:,\\bar O})\\, Q(W_{\\bar O,:})\\big),

where the second product is int8 x int8 with int32 accumulation, :math:`Q(X_{:,\\bar O})` is
quantized per token (row :math:`t`: :math:`S^X_t = \\max_{j \\notin O} |X_{tj}| / 127`) and
:math:`Q(W_{\\bar O,:})` per output channel (:math:`S^W_n = \\max_{j \\notin O} |W_{jn}| / 127`),
and :math:`S^X S^W` is their outer product (``qjax.quantize`` with int8 ``per_token`` and
``per_channel, axis=-1`` specs; the contraction is :func:`qjax.kernels.quantized_dot_general`).
The outlier part runs in float32. :math:`\\tau` is the paper's threshold (6.0).

The outlier set depends on the data, so under ``jit`` it is a mask, not a gather: the outlier
columns of :math:`X` (and rows of :math:`W`) are zeroed for the int8 part and the others for the
float part. Zeroed entries do not change a block's absolute maximum, and an all-zero block gets
the smallest safe scale, so every input (all zeros, every column an outlier) gives finite output.
:math:`\\tau = 0` makes every channel an outlier (a float matmul); :math:`\\tau = \\infty` none
(plain vector-wise int8). Like the paper's formulation (not bitsandbytes, which quantizes the
weight once over all of :math:`K` and dequantizes its outlier rows), the weight's scales here
exclude the outlier rows.

Model integration: :class:`LLMInt8DotGeneral` is a ``dot_general`` for ``nnx.Linear``;
:func:`apply_llm_int8` installs it on a model's Linear layers. :func:`outlier_stats` reports how
many features cross the threshold.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qjax.kernels.xla import quantized_dot_general
from qjax.nn.model import quantizable_layers
from qjax.nn.ops import QuantizedContraction
from qjax.numerics import QuantSpec, quantize
from qjax.numerics.calibration import check_finite, check_float_input

DEFAULT_THRESHOLD = 6.0
PER_TOKEN_INT8 = QuantSpec(dtype="int8", granularity="per_token")
PER_CHANNEL_INT8 = QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
_MATMUL_DN = (((1,), (0,)), ((), ()))


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold >= 0.0:
        raise ValueError(
            f"threshold={threshold!r} must be a number >= 0 (the paper uses 6.0; math.inf: no outliers, "
            "plain vector-wise int8; 0: every feature is an outlier, a float matmul)"
        )
    return float(threshold)


def _check_operands(x: ArrayLike, w: ArrayLike) -> tuple[jax.Array, jax.Array]:
    for arg, v in (("x", x), ("w", w)):
        check_float_input(jnp.asarray(v), arg)
    x, w = jnp.asarray(x), jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w has shape {tuple(w.shape)}; llm_int8_matmul needs a kernel (K, N) (y = x @ w)")
    if x.ndim == 0 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but w has shape {tuple(w.shape)}: x's last axis must be "
            f"K = {w.shape[0]}, the input features of w"
        )
    check_finite(x, "x")
    check_finite(w, "w")
    return x, w


def outlier_mask(x: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> jax.Array:
    """:math:`O` as a boolean mask ``(K,)``: channels with :math:`|x_{tj}| \\ge \\tau` for some token."""
    x = jnp.asarray(x)
    return _outlier_mask(x.reshape(-1, x.shape[-1]).astype(jnp.float32), _check_threshold(threshold))


def _outlier_mask(x2: jax.Array, threshold: float) -> jax.Array:
    return jnp.any(jnp.abs(x2) >= threshold, axis=0)


@jax.jit(static_argnames=("threshold", "precision"))
def _llm_int8_2d(x2: jax.Array, w: jax.Array, threshold: float, precision: Any) -> jax.Array:
    x2, w = x2.astype(jnp.float32), w.astype(jnp.float32)  # (T, K), (K, N)
    outlier = _outlier_mask(x2, threshold)  # (K,)
    zero = jnp.zeros((), jnp.float32)
    x_out = jnp.where(outlier[None, :], x2, zero)  # outlier columns only
    x_reg = jnp.where(outlier[None, :], zero, x2)  # the others
    w_reg = jnp.where(outlier[:, None], zero, w)  # the weight rows they meet
    y_float = jnp.matmul(x_out, w, precision=precision)  # W's regular rows meet zero columns
    qx, qw = quantize(x_reg, PER_TOKEN_INT8), quantize(w_reg, PER_CHANNEL_INT8)
    return y_float + quantized_dot_general(qx, qw, _MATMUL_DN)


def llm_int8_matmul(
    x: ArrayLike, w: ArrayLike, *, threshold: float = DEFAULT_THRESHOLD, precision: Any = None
) -> jax.Array:
    """LLM.int8()'s mixed-precision product ``x @ w`` (see the module docstring for the math).

    Args:
      x: float activations ``(..., K)``; the outlier set is taken over all leading axes of the call.
      w: float kernel ``(K, N)``.
      threshold: :math:`\\tau`: channel :math:`j` is an outlier if :math:`|x_{tj}| \\ge \\tau` anywhere.
      precision: ``lax.Precision`` of the float outlier product (as ``nnx.Linear`` passes it).

    Returns ``(..., N)`` in ``x``'s dtype (computed in float32).
    """
    x, w = _check_operands(x, w)
    threshold = _check_threshold(threshold)
    y = _llm_int8_2d(x.reshape(-1, x.shape[-1]), w, threshold, precision)
    return y.reshape((*x.shape[:-1], w.shape[1])).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LLMInt8DotGeneral:
    """A ``dot_general`` running :func:`llm_int8_matmul`: ``nnx.Linear(..., dot_general=LLMInt8DotGeneral())``
    or ``layer.dot_general = LLMInt8DotGeneral(6.0)``.

    It accepts the contraction a Linear makes (the input's last axis with the kernel's first, no
    batch axes) and refuses others. The weight stays float in the layer and is quantized at each
    call (simulating LLM.int8()'s numerics, not its storage). ``preferred_element_type`` sets the
    output dtype; ``out_sharding`` is accepted and ignored. Hashable and without arrays, so
    ``nnx.jit`` treats it as static.
    """

    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
        out_sharding: Any = None,
    ) -> jax.Array:
        (lc, rc), (lb, rb) = dimension_numbers
        if (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) != ((lhs.ndim - 1,), (0,), (), ()) or rhs.ndim != 2:
            raise ValueError(
                f"LLMInt8DotGeneral contracts x (..., K) with a kernel (K, N); got dimension_numbers="
                f"{dimension_numbers} for shapes {tuple(lhs.shape)} and {tuple(rhs.shape)}: use it on "
                "nnx.Linear (not LinearGeneral over several axes, Einsum or batched contractions)"
            )
        y = llm_int8_matmul(lhs, rhs, threshold=self.threshold, precision=precision)
        return y if preferred_element_type is None else y.astype(preferred_element_type)


def apply_llm_int8(model: nnx.Module, path_regex: str = ".*", threshold: float = DEFAULT_THRESHOLD) -> int:
    """Install :class:`LLMInt8DotGeneral` on every ``nnx.Linear`` of ``model`` whose path fully
    matches ``path_regex`` (paths as in :func:`qjax.nn.quantizable_layers`, e.g. ``"blocks/0/mlp/up"``).

    Changes ``model`` in place (``nnx.clone`` it first to keep the float model) and returns the
    number of layers changed. Raises if nothing matches or a matched layer already has a
    quantized op (a model from ``qjax.nn.quantize_model``).
    """
    try:
        pattern = re.compile(path_regex)
    except (re.error, TypeError) as e:
        raise ValueError(f"path_regex={path_regex!r} is not a valid regular expression ({e})") from None
    hook = LLMInt8DotGeneral(threshold)
    linears = [(p, layer) for p, layer in quantizable_layers(model) if isinstance(layer, nnx.Linear)]
    chosen = [(p, layer) for p, layer in linears if pattern.fullmatch(p)]
    if not chosen:
        paths = ", ".join(p for p, _ in linears) or "none"
        raise ValueError(f"path_regex={path_regex!r} matches no nnx.Linear layer; Linear paths: {paths}")
    for path, layer in chosen:
        if isinstance(layer.dot_general, QuantizedContraction):
            raise ValueError(
                f"layer {path!r} is already quantized by qjax.nn.quantize_model; apply LLM.int8() to "
                "the float model (or exclude the layer with path_regex)"
            )
    for _, layer in chosen:
        layer.dot_general = hook
    return len(chosen)


def outlier_stats(x: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """How many features of ``x`` (``(..., K)``, channels last) LLM.int8() would keep in float.

    With :math:`m_j = \\max_t |x_{tj}|`: ``n_outlier_features`` :math:`= |O|`,
    ``outlier_features`` (the indices of :math:`O`), ``outlier_fraction`` :math:`= |O| / K`,
    ``token_fraction`` (share of tokens with some :math:`|x_{tj}| \\ge \\tau`), ``max_abs``
    :math:`= \\max_j m_j`, ``median_abs`` (median of all :math:`|x|`), ``median_channel_absmax``
    (:math:`\\operatorname{median}_j m_j`) and ``max_over_median`` (their ratio; ``inf`` when only the
    median is 0, 1 for an all-zero ``x``). Eager, float64 numpy; returns plain Python numbers.
    """
    threshold = _check_threshold(threshold)
    x = jnp.asarray(x)
    check_float_input(x, "x")
    if x.ndim == 0 or x.size == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; outlier_stats needs a non-empty (..., K) tensor")
    check_finite(x, "x")
    a = np.abs(np.asarray(x, np.float64)).reshape(-1, x.shape[-1])  # (T, K)
    m = a.max(axis=0)
    over = a >= threshold
    outliers = np.flatnonzero(over.any(axis=0))
    med, top = float(np.median(m)), float(m.max())
    ratio = top / med if med > 0 else (math.inf if top > 0 else 1.0)
    return {
        "n_outlier_features": len(outliers),
        "outlier_features": [int(j) for j in outliers],
        "outlier_fraction": len(outliers) / a.shape[1],
        "token_fraction": float(over.any(axis=1).mean()),
        "max_abs": top,
        "median_abs": float(np.median(a)),
        "median_channel_absmax": med,
        "max_over_median": ratio,
        "threshold": threshold,
    }


__all__ = [
    "DEFAULT_THRESHOLD",
    "LLMInt8DotGeneral",
    "apply_llm_int8",
    "llm_int8_matmul",
    "outlier_mask",
    "outlier_stats",
]
