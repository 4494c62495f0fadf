"""Calibration: the range ``[lo, hi]`` of every block, and the quantization parameters from it.

* ``minmax``: :math:`lo = \\min x`, :math:`hi = \\max x` per block; for signed symmetric and
  float formats, which use only the absolute maximum, :math:`[-\\max|x|, \\max|x|]`.
* ``percentile``: symmetric: :math:`\\pm P_p(|x|)`; asymmetric: :math:`[P_{100-p}(x), P_p(x)]`
  (linear interpolation between order statistics, as ``numpy.percentile``).
* ``mse``: the min-max range shrunk by the ratio :math:`c \\in \\{1/G, 2/G, \\dots, 1\\}` that
  minimises :math:`\\|x - Q_c(x)\\|^2` in each block (nearest rounding during the search; ties go
  to the larger ratio).

**Plug-ins.** A calibration method maps the values of each block to its range:
``fn(blocks, spec) -> (lo, hi)``, where ``blocks`` is the float32 tensor with each block's values
on the last axis, shape ``grid + (n,)`` (:func:`qjax.numerics.tiling.blocks_last`), and ``lo``,
``hi`` have the grid's shape. The format turns the range into a scale and zero point
(``symmetric`` formats use :math:`\\max(|lo|, |hi|)`). :func:`register_calibration` adds one;
``QuantSpec(calibration=name)`` then accepts its name wherever scales are computed from the tensor
(weights, dynamic activations; static activation scales come from the rule's observer). The
built-ins are looked up in the same registry (:data:`qjax.numerics.spec.CALIBRATIONS`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics import tiling
from qjax.numerics.formats import IntFormat, QParams
from qjax.numerics.rounding import Rounding
from qjax.numerics.spec import CALIBRATIONS, Calibration, QuantSpec

BlockCalibration = Callable[[jax.Array, QuantSpec], tuple[jax.Array, jax.Array]]


def tiled_qparams(qp: QParams, block: tuple[int, ...]) -> QParams:
    """Grid-shaped parameters reshaped to broadcast against a tiled tensor (scalars stay)."""

    def expand(p: jax.Array | None) -> jax.Array | None:
        return p if p is None or p.ndim == 0 else tiling.expand(p, block)

    return QParams(expand(qp.scale), expand(qp.zero_point), expand(qp.tensor_scale))  # type: ignore[arg-type]


def check_finite(x: jax.Array, arg: str = "x") -> None:
    """Raise if a concrete (not traced) ``x`` holds NaN or Inf; a no-op under ``jit``."""
    if isinstance(x, jax.core.Tracer):
        return
    finite = np.isfinite(np.asarray(x))  # numpy: a concrete array captured by a trace stays concrete
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise ValueError(
            f"{arg} holds {bad} NaN or Inf value(s) (seen when computing its scales); quantization needs "
            "finite inputs: check the data or the model for overflow before quantizing"
        )


def check_float_input(x: jax.Array, arg: str = "x") -> None:
    """Quantizers take real-valued floating-point tensors with at least one element (a scale of
    nothing is undefined: every quantizer refuses a zero-size tensor the same way)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"{arg} has dtype {jnp.result_type(x)}, but quantization needs a floating-point "
            f"tensor; convert it first, e.g. {arg}.astype(jnp.float32)"
        )
    if 0 in np.shape(x):
        raise ValueError(
            f"{arg} has shape {tuple(np.shape(x))}, no elements to quantize; skip empty tensors "
            "before quantizing (a scale of nothing is undefined)"
        )


def block_range(x: jax.Array, spec: QuantSpec, block: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Per-block ``(lo, hi)`` of float32 ``x`` by ``spec.calibration``, grid-shaped."""
    return CALIBRATIONS.get(spec.calibration)(x, spec, block)


def _percentile_range(x: jax.Array, spec: QuantSpec, block: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    flat = tiling.blocks_last(x, block)
    if spec.symmetric:
        amax = jnp.percentile(jnp.abs(flat), spec.percentile, axis=-1)
        return -amax, amax
    lo = jnp.percentile(flat, 100.0 - spec.percentile, axis=-1)
    return lo, jnp.percentile(flat, spec.percentile, axis=-1)


def _tiled_minmax(t: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Min-max (absmax) of each block of the tiled ``t``."""
    return _minmax(t, spec, tiling.inner_axes(t.ndim // 2), keepdims=False)


def _minmax(
    x: jax.Array, spec: QuantSpec, axes: tuple[int, ...], *, keepdims: bool
) -> tuple[jax.Array, jax.Array]:
    fmt = spec.format
    if spec.symmetric and not (isinstance(fmt, IntFormat) and not fmt.signed):
        # Signed symmetric and float formats use only max|x|: one reduction instead of two.
        amax = jnp.max(jnp.abs(x), axis=axes, keepdims=keepdims)
        return -amax, amax
    return jnp.min(x, axis=axes, keepdims=keepdims), jnp.max(x, axis=axes, keepdims=keepdims)


def _minmax_range(x: jax.Array, spec: QuantSpec, block: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    axes = tiling.spanned_axes(x.shape, block)
    if axes is not None:  # the same extremes, reduced in place
        return _minmax(x, spec, axes, keepdims=True)
    return _tiled_minmax(tiling.tile(x, block), spec)


def _mse_range(x: jax.Array, spec: QuantSpec, block: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    t = tiling.tile(x, block)
    return _mse_search(t, *_tiled_minmax(t, spec), spec)


def _mse_search(t: jax.Array, lo: jax.Array, hi: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Shrink each block's range by the ratio with the least squared quantization error."""
    fmt = spec.affine_format
    block = tuple(t.shape[1::2])
    inner = tiling.inner_axes(lo.ndim)

    def error(ratio: jax.Array) -> jax.Array:
        qp = fmt.qparams(ratio * lo, ratio * hi, spec.symmetric)
        qp_t = tiled_qparams(qp, block)
        x_hat = fmt.decode(fmt.encode(t, qp_t, Rounding.NEAREST, None), qp_t)
        return jnp.sum(jnp.square(t - x_hat), axis=inner)

    def step(i: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        best_err, best_ratio = carry
        ratio = (spec.mse_grid - i) / spec.mse_grid  # from 1 downwards: ties keep the larger
        err = error(jnp.asarray(ratio, jnp.float32))
        better = err < best_err
        return jnp.where(better, err, best_err), jnp.where(better, ratio, best_ratio)

    init = (jnp.full(lo.shape, jnp.inf, jnp.float32), jnp.ones(lo.shape, jnp.float32))
    _, ratio = jax.lax.fori_loop(0, spec.mse_grid, step, init)
    return ratio * lo, ratio * hi


CALIBRATIONS.register(Calibration.MINMAX.value, _minmax_range)
CALIBRATIONS.register(Calibration.PERCENTILE.value, _percentile_range)
CALIBRATIONS.register(Calibration.MSE.value, _mse_range)
CALIBRATIONS.seal()


def register_calibration(name: str, fn: BlockCalibration, *, override: bool = False) -> None:
    """Register the calibration method ``name``: ``fn(blocks, spec) -> (lo, hi)`` with ``blocks``
    the float32 values of each block on the last axis, shape ``grid + (n,)``, and ``lo``, ``hi``
    of shape ``grid`` (see the module docstring). Raises ``ValueError`` for a name already
    registered unless ``override=True`` (built-in names are reserved).

    .. code-block:: python

        def absmean3(blocks, spec):  # 3 x mean|x| per block
            a = 3.0 * jnp.mean(jnp.abs(blocks), axis=-1)
            return -a, a

        qjax.numerics.register_calibration("absmean3", absmean3)
        spec = qjax.QuantSpec(dtype="int4", calibration="absmean3")
    """
    if not callable(fn):
        raise TypeError(f"register_calibration({name!r}, fn): fn must be callable; got {type(fn).__name__}")

    def block_range_of(x: jax.Array, spec: QuantSpec, block: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        lo, hi = fn(tiling.blocks_last(x, block), spec)
        grid = tiling.grid_shape(x.shape, block)
        return jnp.broadcast_to(lo, grid).astype(jnp.float32), jnp.broadcast_to(hi, grid).astype(jnp.float32)

    CALIBRATIONS.register(name, block_range_of, override=override)


def calibrate(x: jax.Array, spec: QuantSpec) -> QParams:
    """Quantization parameters of ``x`` under ``spec``: grid-shaped (one entry per block).

    Raises on non-float input, on a spec that does not fit ``x``'s shape, and on NaN/Inf when
    called eagerly.
    """
    check_float_input(x)
    fmt = spec.affine_format
    check_finite(x)
    block = tiling.block_shape(x.shape, spec)
    lo, hi = block_range(jnp.asarray(x, jnp.float32), spec, block)
    return fmt.qparams(lo, hi, spec.symmetric)
