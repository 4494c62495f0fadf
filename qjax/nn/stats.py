"""Activation statistics collected by ``calibrate`` mode, and the static ranges they give.

Statistics live in :class:`QuantStats` variables, a variable type of their own: they are not
``nnx.Param``, so an optimizer built on ``nnx.Param`` never touches them. All updates are pure
functions of the previous statistics and a batch, usable under ``jit``.

* min / max: running extremes over every calibration batch;
* moving average: :math:`m \\leftarrow d\\, m + (1 - d) \\min(x)` (and the same for the max);
* mean |x|: running mean (LSQ's initial step size :math:`2\\,\\mathbb{E}|x| / \\sqrt{q_{max}}`);
* histogram of |x| over :math:`[0, a]`, where :math:`a` is the running max of |x|; when a batch
  raises :math:`a`, the old counts move to the new bins that hold their bin centres.
"""

from __future__ import annotations

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from qjax.nn.rules import ActivationScale, Observer, Rule
from qjax.numerics import QParams, QuantSpec, quantize_dequantize
from qjax.numerics.spec import Calibration
from qjax.ste import Estimator

# activation estimators whose learned parameters calibration initialises from the statistics
_INITIALISED_FROM_STATS = (Estimator.LSQ, Estimator.LSQ_PLUS, Estimator.PACT)


class QuantStats(nnx.Variable):
    """Calibration statistics of a quantizer (not trained)."""


class StaticQParams(nnx.Variable):
    """Static activation scale and zero point fixed by calibration (not trained)."""


Stats = dict[str, jax.Array]


def needs_statistics(rule: Rule) -> bool:
    """Whether calibration statistics of a layer's input are read: for static activation scales,
    and to initialise learned activation quantizers (LSQ and LSQ+ step sizes and offsets, PACT
    clips). A layer with dynamic scales and a stateless estimator (STE, clipped STE) reads none,
    so it keeps none and calibration leaves it as it is."""
    if rule.activations is None:
        return False
    return (
        rule.activation_scale == ActivationScale.STATIC
        or rule.activation_estimator in _INITIALISED_FROM_STATS
    )


def init_stats(bins: int) -> Stats:
    return {
        "count": jnp.zeros((), jnp.int32),
        "min": jnp.zeros((), jnp.float32),
        "max": jnp.zeros((), jnp.float32),
        "ema_min": jnp.zeros((), jnp.float32),
        "ema_max": jnp.zeros((), jnp.float32),
        "mean_abs": jnp.zeros((), jnp.float32),
        "hist": jnp.zeros((bins,), jnp.float32),
        "hist_max": jnp.zeros((), jnp.float32),
    }


def _histogram(a: jax.Array, top: jax.Array, bins: int) -> jax.Array:
    width = jnp.maximum(top / bins, jnp.finfo(jnp.float32).tiny)
    idx = jnp.clip(jnp.floor(a * (1.0 / width)), 0, bins - 1).astype(jnp.int32)
    return jax.ops.segment_sum(jnp.ones_like(a), idx, num_segments=bins)


def update_stats(stats: Stats, x: jax.Array, ema_decay: float) -> Stats:
    """Statistics after one more batch ``x``."""
    x = x.astype(jnp.float32)
    a = jnp.abs(x).reshape(-1)
    first = stats["count"] == 0
    lo, hi = jnp.min(x), jnp.max(x)
    bins = stats["hist"].shape[0]
    top = jnp.maximum(stats["hist_max"], jnp.max(a))
    # Move the old counts into the widened bins by their centres, then add this batch.
    old_width = stats["hist_max"] / bins
    centres = (jnp.arange(bins, dtype=jnp.float32) + 0.5) * old_width
    new_width = jnp.maximum(top / bins, jnp.finfo(jnp.float32).tiny)
    moved = jnp.clip(jnp.floor(centres * (1.0 / new_width)), 0, bins - 1).astype(jnp.int32)
    hist = jax.ops.segment_sum(stats["hist"], moved, num_segments=bins) + _histogram(a, top, bins)
    n_old = stats["count"].astype(jnp.float32)
    n_new = jnp.float32(a.size)
    decay = jnp.where(first, 0.0, ema_decay)
    return {
        "count": stats["count"] + a.size,
        "min": jnp.where(first, lo, jnp.minimum(stats["min"], lo)),
        "max": jnp.where(first, hi, jnp.maximum(stats["max"], hi)),
        "ema_min": decay * stats["ema_min"] + (1.0 - decay) * lo,
        "ema_max": decay * stats["ema_max"] + (1.0 - decay) * hi,
        "mean_abs": (stats["mean_abs"] * n_old + jnp.sum(a)) / (n_old + n_new),
        "hist": hist,
        "hist_max": top,
    }


def _histogram_percentile(stats: Stats, percentile: float) -> jax.Array:
    hist = stats["hist"]
    bins = hist.shape[0]
    cdf = jnp.cumsum(hist) / jnp.maximum(jnp.sum(hist), 1.0)
    idx = jnp.argmax(cdf >= percentile / 100.0)
    return (idx + 1).astype(jnp.float32) * (stats["hist_max"] / bins)  # upper edge of that bin


def _histogram_mse(stats: Stats, spec: QuantSpec) -> jax.Array:
    """The clip of |x| minimising the histogram-weighted squared error of symmetric quantization."""
    hist = stats["hist"]
    bins = hist.shape[0]
    centres = (jnp.arange(bins, dtype=jnp.float32) + 0.5) * (stats["hist_max"] / bins)
    per_tensor = QuantSpec(dtype=spec.dtype, symmetric=spec.symmetric, narrow_range=spec.narrow_range)
    ratios = jnp.arange(spec.mse_grid, 0, -1, dtype=jnp.float32) / spec.mse_grid

    def error(ratio: jax.Array) -> jax.Array:
        clip = ratio * stats["hist_max"]
        qp = per_tensor.affine_format.qparams(-clip, clip, True)
        x_hat = quantize_dequantize(centres, per_tensor, qparams=qp)
        return jnp.sum(hist * jnp.square(centres - x_hat))

    errors = jax.vmap(error)(ratios)
    return ratios[jnp.argmin(errors)] * stats["hist_max"]


def static_range(stats: Stats, observer: Observer | str, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` of the activations from calibration statistics."""
    if observer == Observer.MOVING_AVERAGE:
        return stats["ema_min"], stats["ema_max"]
    if observer == Observer.HISTOGRAM:
        if spec.calibration == Calibration.MSE:
            clip = _histogram_mse(stats, spec)
        elif spec.calibration == Calibration.PERCENTILE:
            clip = _histogram_percentile(stats, spec.percentile)
        elif spec.calibration == Calibration.MINMAX:
            clip = stats["hist_max"]
        else:
            raise ValueError(
                f"calibration={str(spec.calibration)!r} (a plug-in) reads a tensor, not a histogram: "
                "the histogram observer takes calibration 'minmax', 'percentile' or 'mse'; use "
                "activation_scale='dynamic' for the plug-in's range, or one of those"
            )
        return jnp.maximum(stats["min"], -clip), jnp.minimum(stats["max"], clip)
    return stats["min"], stats["max"]


def static_qparams(stats: Stats, observer: Observer | str, spec: QuantSpec) -> QParams:
    """Per-tensor quantization parameters (scalars) from calibration statistics."""
    lo, hi = static_range(stats, observer, spec)
    qp = spec.affine_format.qparams(lo, hi, spec.symmetric)
    scalar = lambda p: None if p is None else p.reshape(())
    return QParams(qp.scale.reshape(()), scalar(qp.zero_point), scalar(qp.tensor_scale))


def lsq_scale_from_stats(stats: Stats, qmax: int) -> jax.Array:
    """LSQ's initial step size from the calibrated mean |x|."""
    return jnp.maximum(2.0 * stats["mean_abs"] / math.sqrt(qmax), jnp.finfo(jnp.float32).tiny)
