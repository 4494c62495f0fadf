"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then W8A8.

A linear layer :math:`Y = X W` (Flax layout: kernel :math:`W` of shape ``(K, N)``) is unchanged by
a per-input-channel rescaling :math:`s \\in \\mathbb{R}_{>0}^K`:

.. math::

    Y = \\big(X \\operatorname{diag}(s)^{-1}\\big) \\big(\\operatorname{diag}(s) W\\big), \\qquad
    s_j = \\frac{\\max |X_j|^{\\alpha}}{\\max_i \\max_n |W^{(i)}_{jn}|^{1 - \\alpha}},

where :math:`\\max|X_j|` runs over calibration tokens and the weight maximum over every layer
:math:`W^{(i)}` that reads the same input (q, k and v after one norm). ``alpha`` moves the
quantization difficulty: 0 leaves it on the activations (only the weights are equalised), 1
moves all of it to the weights (every channel of :math:`X / s` has maximum 1); the paper uses
0.5 for most models.

The division :math:`X / s` is folded into whatever produces :math:`X` (:func:`smooth`: the
weight of the preceding RMSNorm / LayerNorm; :func:`smooth_linear_pair`: the columns and bias of
a preceding linear layer), so the smoothed float model computes the same function with no extra
operation; :math:`s` goes into the rows of the following kernels. The smoothed model is then
quantized W8A8 with ordinary rules (:func:`smoothquant_rules`).

Conventions of :mod:`qjax.numerics`: a division is a multiplication by the reciprocal rounded
once; channels whose activation or weight maximum is 0 get :math:`s_j = 1`; every factor is
clamped to ``[min_scale, float32 max]``, so no NaN or Inf comes out of finite inputs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qjax.nn.rules import ActivationScale, Rule
from qjax.nn.stats import QuantStats
from qjax.numerics import Granularity, QuantSpec
from qjax.numerics.calibration import check_finite, check_float_input
from qjax.numerics.formats import FLOAT32_MAX, MIN_SCALE

MIN_SMOOTHING = 1e-5  # the reference implementation's clamp of s (and of the weight maxima)


class SmoothQuantLevel(enum.StrEnum):
    """SmoothQuant's W8A8 levels (see :func:`smoothquant_rules`)."""

    O1 = "O1"  # per-token activation scales, dynamic
    O2 = "O2"  # per-tensor activation scales, dynamic
    O3 = "O3"  # per-tensor activation scales, static (calibrated)


LEVELS: tuple[str, ...] = tuple(level.value for level in SmoothQuantLevel)

# -- statistics -----------------------------------------------------------------------------------


@jax.jit
def channel_absmax(x: ArrayLike) -> jax.Array:
    """:math:`m_j = \\max_{t} |x_{t j}|` over every axis but the last: ``(..., K) -> (K,)``, float32."""
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("x is a scalar; channel_absmax needs a tensor (..., K) with channels last")
    return jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1]), axis=0)


def update_absmax(running: ArrayLike | None, x: ArrayLike) -> jax.Array:
    """The running per-channel maximum after one more batch: :math:`\\max(m, \\max_t |x_{tj}|)`.

    ``running=None`` starts a new statistic (the first batch's :func:`channel_absmax`).
    """
    m = channel_absmax(x)
    if running is None:
        return m
    running = jnp.asarray(running, jnp.float32)
    if running.shape != m.shape:
        raise ValueError(
            f"running has shape {tuple(running.shape)} but x has {m.shape[0]} channels (last axis); "
            "keep one running maximum per layer input"
        )
    return jnp.maximum(running, m)


class _AbsMaxRecorder(nnx.Module):
    """A ``dot_general`` hook that records the per-channel max|x| of its input, then passes it on."""

    def __init__(self, inner: Callable[..., Any] | None, channels: int):
        self.inner = inner
        self.absmax = QuantStats(jnp.zeros((channels,), jnp.float32))
        self.calls = QuantStats(jnp.zeros((), jnp.int32))

    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, *args: Any, **kw: Any) -> Any:
        (contracting, _), (batch, _) = dimension_numbers
        if tuple(contracting) != (lhs.ndim - 1,) or tuple(batch):
            raise ValueError(
                f"collect_act_absmax records inputs contracted over their last axis only; got "
                f"dimension_numbers={dimension_numbers}: use it on plain nnx.Linear layers"
            )
        self.absmax.set_value(jnp.maximum(self.absmax.get_value(), channel_absmax(lhs)))
        self.calls.set_value(self.calls.get_value() + 1)
        inner = jax.lax.dot_general if self.inner is None else self.inner
        return inner(lhs, rhs, dimension_numbers, *args, **kw)


def collect_act_absmax(
    model: nnx.Module,
    layers: Sequence[nnx.Linear],
    batches: Iterable[Any],
    forward: Callable[[Any, Any], Any] | None = None,
) -> list[jax.Array]:
    """Per-input-channel :math:`\\max|X_j|` of each of ``layers`` over calibration ``batches``.

    Each layer's ``dot_general`` hook is wrapped, for the length of the call, by a recorder that
    keeps the running maximum of :math:`|x|` per input feature (an ``nnx`` variable, so the
    forward runs under ``nnx.jit``) and passes the call on to the layer's own hook (float, or a
    quantized op). The hooks are restored on exit, also on error. ``forward(model, batch)``
    defaults to ``model(batch)``. Returns one float32 ``(in_features,)`` array per layer, in order.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty; pass the nnx.Linear layers whose inputs to record")
    for i, layer in enumerate(layers):
        if not isinstance(layer, nnx.Linear):
            raise TypeError(f"layers[{i}] is a {type(layer).__name__}; collect_act_absmax records nnx.Linear")
        if any(layer is other for other in layers[:i]):
            raise ValueError(f"layers[{i}] appears twice in layers; list each layer once")
    fwd = nnx.jit(forward if forward is not None else (lambda m, b: m(b)))
    saved = [layer.dot_general for layer in layers]
    recorders = [_AbsMaxRecorder(h, layer.in_features) for h, layer in zip(saved, layers, strict=True)]
    try:
        for layer, rec in zip(layers, recorders, strict=True):
            layer.dot_general = nnx.data(rec)
        n = 0
        for batch in batches:
            fwd(model, batch)
            n += 1
    finally:
        for layer, h in zip(layers, saved, strict=True):
            layer.dot_general = nnx.data(h) if isinstance(h, nnx.Module) else nnx.static(h)
    if n == 0:
        raise ValueError("batches is empty; pass an iterable of at least one calibration batch")
    for i, rec in enumerate(recorders):
        if int(rec.calls.get_value()) == 0:
            raise ValueError(
                f"layers[{i}] was never called by forward(model, batch); pass layers of this model "
                "that its forward uses"
            )
    return [rec.absmax.get_value() for rec in recorders]


# -- smoothing factors and folding ----------------------------------------------------------------


def _float(x: ArrayLike, arg: str) -> jax.Array:
    check_float_input(jnp.asarray(x), arg)
    x = jnp.asarray(x)
    check_finite(x, arg)
    return x


def _compute_dtype(*xs: jax.Array) -> jnp.dtype:
    """float64 where any operand is float64 (x64 mode), else float32."""
    return jnp.dtype(jnp.float64 if any(x.dtype == jnp.float64 for x in xs) else jnp.float32)


def _check_weights(
    weights: Sequence[ArrayLike], k: int, fn: str, *, allow_empty: bool = False
) -> list[jax.Array]:
    if isinstance(weights, jax.Array | np.ndarray):
        raise TypeError(f"{fn}: weights must be a list of (K, N_i) kernels; wrap a single kernel in a list")
    ws = [_float(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if not ws and not allow_empty:
        raise ValueError(f"{fn}: weights is empty; pass the kernels (K, N_i) that read this input")
    for i, w in enumerate(ws):
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(
                f"{fn}: weights[{i}] has shape {tuple(w.shape)}, but a kernel reading {k} input "
                f"channels has shape ({k}, N) (Flax layout, y = x @ W)"
            )
    return ws


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1]; the paper uses 0.5 for most models")
    return float(alpha)


def smoothing_factors(
    act_absmax: ArrayLike,
    weights: Sequence[ArrayLike],
    alpha: float = 0.5,
    *,
    min_scale: float = MIN_SMOOTHING,
) -> jax.Array:
    """SmoothQuant's per-input-channel factors :math:`s`, shape ``(K,)``.

    .. math::

        a_j = \\max_t |X_{tj}|, \\qquad w_j = \\max_i \\max_n |W^{(i)}_{jn}|, \\qquad
        s_j = \\operatorname{clip}\\big(a_j^{\\alpha} \\cdot \\mathrm{fl}(1 / w_j^{1-\\alpha}),
            \\ \\mathtt{min\\_scale},\\ f_{max}\\big),

    with :math:`s_j = 1` where :math:`a_j = 0` or :math:`w_j = 0` (nothing to balance) and
    :math:`w_j` floored at the smallest normal float32 before the reciprocal.

    Args:
      act_absmax: :math:`a`, the calibrated per-channel max|X| (:func:`channel_absmax`), ``(K,)``.
      weights: every kernel ``(K, N_i)`` that reads this input (one smoothing serves them all).
      alpha: migration strength in [0, 1].
      min_scale: the smallest factor (the reference implementation clamps at 1e-5).

    Computed in float32 (float64 where an input is float64).
    """
    a = _float(act_absmax, "act_absmax")
    if a.ndim != 1:
        raise ValueError(
            f"act_absmax has shape {tuple(a.shape)}; it must be (K,), one max|X_j| per input channel "
            "(reduce with channel_absmax)"
        )
    if not isinstance(a, jax.core.Tracer) and bool(jnp.any(a < 0)):
        raise ValueError("act_absmax has negative entries; it must hold max|X_j| >= 0 (use channel_absmax)")
    alpha = _check_alpha(alpha)
    if not 0.0 < float(min_scale) <= 1.0:
        raise ValueError(f"min_scale={min_scale!r} must be in (0, 1], e.g. 1e-5")
    ws = _check_weights(weights, a.shape[0], "smoothing_factors")
    dtype = _compute_dtype(a, *ws)
    w = jnp.max(jnp.stack([jnp.max(jnp.abs(x.astype(dtype)), axis=1) for x in ws]), axis=0)
    return _factors(a.astype(dtype), w, alpha, float(min_scale))


@jax.jit
def _factors(a: jax.Array, w: jax.Array, alpha: float, min_scale: float) -> jax.Array:
    inv_w = 1.0 / jnp.power(jnp.maximum(w, MIN_SCALE), 1.0 - alpha)
    s = jnp.clip(jnp.power(a, alpha) * inv_w, min_scale, FLOAT32_MAX)
    return jnp.where((a > 0) & (w > 0), s, jnp.ones_like(s))


def _check_s(s: ArrayLike, k: int | None, fn: str) -> jax.Array:
    s = _float(s, "s")
    if s.ndim != 1 or (k is not None and s.shape[0] != k):
        want = "(K,)" if k is None else f"({k},)"
        raise ValueError(f"{fn}: s has shape {tuple(s.shape)}; it must be {want}, one factor per channel")
    if not isinstance(s, jax.core.Tracer) and bool(jnp.any(s <= 0)):
        raise ValueError(f"{fn}: s has entries <= 0; smoothing factors must be positive (smoothing_factors)")
    return s


def _scale(x: jax.Array, factor: jax.Array, axis: int) -> jax.Array:
    """``x`` times ``factor`` along ``axis``, computed wide and returned in ``x``'s dtype."""
    dtype = _compute_dtype(x, factor)
    shape = [1] * x.ndim
    shape[axis] = factor.shape[0]
    return (x.astype(dtype) * factor.astype(dtype).reshape(shape)).astype(x.dtype)


def _inverse(s: jax.Array) -> jax.Array:
    return 1.0 / s.astype(_compute_dtype(s))


def smooth(
    norm_weight: ArrayLike, weights: Sequence[ArrayLike], s: ArrayLike
) -> tuple[jax.Array, list[jax.Array]]:
    """Fold the smoothing into a norm and the kernels after it: ``(norm_weight / s, [diag(s) W_i])``.

    .. math::

        \\gamma' = \\gamma \\odot \\mathrm{fl}(1/s), \\qquad W'^{(i)} = \\operatorname{diag}(s)\\, W^{(i)},

    so :math:`\\operatorname{norm}_{\\gamma'}(x)\\, W'^{(i)} = \\operatorname{norm}_\\gamma(x)\\, W^{(i)}`
    for RMSNorm and a bias-free LayerNorm. A LayerNorm bias :math:`\\beta` becomes
    :math:`\\beta / s` too: ``smooth(beta, [], s)[0]``. Outputs keep their inputs' dtypes.
    """
    g = _float(norm_weight, "norm_weight")
    if g.ndim != 1:
        raise ValueError(f"norm_weight has shape {tuple(g.shape)}; a norm's scale is (K,)")
    s = _check_s(s, g.shape[0], "smooth")
    ws = _check_weights(weights, g.shape[0], "smooth", allow_empty=True)
    return _scale(g, _inverse(s), 0), [_scale(w, s, 0) for w in ws]


def smooth_linear_pair(
    w_prev: ArrayLike, b_prev: ArrayLike | None, w_next: ArrayLike, s: ArrayLike
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Fold the smoothing between two linear layers: ``(w_prev / s, b_prev / s, diag(s) w_next)``.

    .. math::

        W'_{prev} = W_{prev} \\operatorname{diag}(\\mathrm{fl}(1/s)), \\quad b'_{prev} = b_{prev} \\odot
        \\mathrm{fl}(1/s), \\quad W'_{next} = \\operatorname{diag}(s)\\, W_{next},

    for :math:`h = x W_{prev} + b_{prev}`, :math:`y = h W_{next}` (kernels ``(K0, K)`` and
    ``(K, N)``). Exact also across a positively homogeneous activation between them (ReLU:
    :math:`\\mathrm{relu}(h/s) = \\mathrm{relu}(h)/s` for :math:`s > 0`), not across GELU or SiLU.
    """
    wp, wn = _float(w_prev, "w_prev"), _float(w_next, "w_next")
    if wp.ndim != 2 or wn.ndim != 2 or wp.shape[1] != wn.shape[0]:
        raise ValueError(
            f"w_prev {tuple(wp.shape)} and w_next {tuple(wn.shape)} must be kernels (K0, K) and (K, N) "
            "with the same K (w_prev's outputs are w_next's inputs)"
        )
    k = wn.shape[0]
    s = _check_s(s, k, "smooth_linear_pair")
    inv = _inverse(s)
    b = None
    if b_prev is not None:
        b = _float(b_prev, "b_prev")
        if b.shape != (k,):
            raise ValueError(f"b_prev has shape {tuple(b.shape)}; w_prev's bias is ({k},)")
        b = _scale(b, inv, 0)
    return _scale(wp, inv, 1), b, _scale(wn, s, 0)


# -- W8A8 rules -----------------------------------------------------------------------------------


def smoothquant_rules(
    level: SmoothQuantLevel | str = SmoothQuantLevel.O1,
    path: str = ".*",
    *,
    weight_granularity: Granularity | str = Granularity.PER_CHANNEL,
) -> list[Rule]:
    """qjax rules for SmoothQuant's W8A8 levels on the (already smoothed) layers matching ``path``.

    ======  ===============================  ===============================================
    level   activations (int8, symmetric)    scale
    ======  ===============================  ===============================================
    ``O1``  per token                        dynamic (each token's max at run time)
    ``O2``  per tensor                       dynamic (each batch's max at run time)
    ``O3``  per tensor                       static (calibrated: run ``qjax.nn.calibrate``)
    ======  ===============================  ===============================================

    Weights are int8, symmetric and by default **per output channel** (``axis=-1``) at every
    level; the paper's O1-O3 use per-tensor weights, which are coarser:
    ``weight_granularity='per_tensor'`` reproduces them exactly. Prepend exclusions
    (``Rule(path=...)``) to keep layers in float.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not one of {list(LEVELS)} (SmoothQuant's W8A8 levels)")
    if weight_granularity == Granularity.PER_CHANNEL:
        weights = QuantSpec(dtype="int8", granularity=Granularity.PER_CHANNEL, axis=-1)
    elif weight_granularity == Granularity.PER_TENSOR:
        weights = QuantSpec(dtype="int8")
    else:
        raise ValueError(
            f"weight_granularity={weight_granularity!r} must be 'per_channel' (default) or 'per_tensor' "
            "(the paper's setting)"
        )
    per_token = level == SmoothQuantLevel.O1
    acts = QuantSpec(dtype="int8", granularity=Granularity.PER_TOKEN if per_token else Granularity.PER_TENSOR)
    scale = ActivationScale.STATIC if level == SmoothQuantLevel.O3 else ActivationScale.DYNAMIC
    return [Rule(path=path, weights=weights, activations=acts, activation_scale=scale)]


__all__ = [
    "LEVELS",
    "MIN_SMOOTHING",
    "SmoothQuantLevel",
    "channel_absmax",
    "collect_act_absmax",
    "smooth",
    "smooth_linear_pair",
    "smoothing_factors",
    "smoothquant_rules",
    "update_absmax",
]
