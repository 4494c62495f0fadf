"""The public quantizers: ``quantize`` (to a stored ``QArray``), ``dequantize``, and the fused
``quantize_dequantize`` that simulated (fake-quant) paths use. Both paths run the same
``encode``/``decode`` math, so they agree bit for bit.

These functions are not differentiable (rounding has zero gradient almost everywhere); the
estimators in :mod:`qjax.ste` wrap them for training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qjax.numerics import kmeans, tiling
from qjax.numerics.calibration import block_range, check_finite, check_float_input, tiled_qparams
from qjax.numerics.formats import CodebookFormat, QParams
from qjax.numerics.qarray import QArray, pack_values
from qjax.numerics.rounding import Rounding, uniform_noise
from qjax.numerics.spec import QuantSpec


def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(
            f"spec must be a qjax.QuantSpec; got {type(spec).__name__} "
            "(build one with qjax.QuantSpec(...) or qjax.QuantSpec.from_dict(...))"
        )


def check_qparams(qp: QParams, grid: tuple[int, ...]) -> QParams:
    for name, p in (("scale", qp.scale), ("zero_point", qp.zero_point)):
        if p is not None and p.ndim and tuple(p.shape) != grid:
            raise ValueError(
                f"qparams.{name} has shape {tuple(p.shape)} but this spec and tensor need one per "
                f"block, shape {grid}; calibrate with the same spec and shape"
            )
    return qp


def _prepare(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, tuple[int, ...]]:
    _check_spec(spec)
    check_float_input(x)
    x = jnp.asarray(x)
    return x.astype(jnp.float32), tiling.block_shape(x.shape, spec)


def _params(x32: jax.Array, spec: QuantSpec, block: tuple[int, ...], qparams: QParams | None) -> QParams:
    if qparams is not None:
        return check_qparams(QParams(*qparams), tiling.grid_shape(x32.shape, block))
    check_finite(x32)
    lo, hi = block_range(x32, spec, block)
    return spec.affine_format.qparams(lo, hi, spec.symmetric)


def _per_element(
    method: Callable[..., jax.Array], x32: jax.Array, spec: QuantSpec, qp: QParams, noise: jax.Array | None
) -> jax.Array:
    """``method(x, qp, rounding, noise)`` of the format, on the tiled ``x32``, untiled."""
    block = tiling.block_shape(x32.shape, spec)
    noise_t = None if noise is None else tiling.tile(noise, block)
    out = method(tiling.tile(x32, block), tiled_qparams(qp, block), spec.rounding, noise_t)
    return tiling.untile(out, x32.shape)


def encode(x32: jax.Array, spec: QuantSpec, qp: QParams, noise: jax.Array | None = None) -> jax.Array:
    """Quantized values of float32 ``x32`` (same shape) given grid-shaped ``qp``.

    ``noise``: U[0, 1) draws of ``x32``'s shape for stochastic rounding (see ``noise_for``).
    """
    return _per_element(spec.affine_format.encode, x32, spec, qp, noise)


def unclipped(x32: jax.Array, spec: QuantSpec, qp: QParams, noise: jax.Array | None = None) -> jax.Array:
    """Where clipping leaves the encoding of float32 ``x32`` unchanged (bool, same shape): for
    integer formats :math:`q_{min} \\le \\operatorname{round}(x/S) + Z \\le q_{max}` with the
    rounding and ``noise`` of :func:`encode`, for float formats the rounded :math:`|x/S|` within
    :math:`f_{max}` (see :mod:`qjax.numerics.formats`). The clipped STE's mask."""
    return _per_element(spec.affine_format.unclipped, x32, spec, qp, noise)


def clipped_by_nearest(x32: jax.Array, spec: QuantSpec, qp: QParams) -> jax.Array:
    """Where round-to-nearest encoding of float32 ``x32`` clips (bool, same shape): the complement
    of :func:`unclipped` with ``nearest`` rounding, decided in the integer domain (an element at
    :math:`q_{max} S` one ulp above the float bound is not clipped). What clipping statistics count."""
    return ~unclipped(x32, dataclasses.replace(spec, rounding=Rounding.NEAREST), qp)


def decode(values: jax.Array, spec: QuantSpec, qp: QParams) -> jax.Array:
    """Float32 real values of quantized ``values`` given grid-shaped ``qp``."""
    block = tiling.block_shape(values.shape, spec)
    t = tiling.tile(values, block)
    return tiling.untile(spec.affine_format.decode(t, tiled_qparams(qp, block)), values.shape)


def clip_bounds(shape: tuple[int, ...], spec: QuantSpec, qp: QParams) -> tuple[jax.Array, jax.Array]:
    """The representable range ``[lo, hi]`` of every element of a tensor of ``shape``."""
    block = tiling.block_shape(shape, spec)
    lo, hi = spec.affine_format.clip_range(tiled_qparams(qp, block))
    return tiling.per_element(lo, shape, block), tiling.per_element(hi, shape, block)


def noise_for(key: jax.Array | None, shape: tuple[int, ...], spec: QuantSpec) -> jax.Array | None:
    """The uniform draws ``spec.rounding`` needs for a tensor of ``shape`` (None if deterministic)."""
    return uniform_noise(key, shape, spec.rounding)


def _kmeans(x32: jax.Array, spec: QuantSpec, block: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    check_finite(x32)
    fmt = spec.format
    assert isinstance(fmt, CodebookFormat)
    k = 2**fmt.bits
    codebook, idx = kmeans.kmeans(tiling.blocks_last(x32, block), k, spec.kmeans_iters)
    return codebook, tiling.unblocks_last(idx, x32.shape, block)


def quantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    qparams: QParams | None = None,
) -> QArray:
    """Quantize ``x`` into a stored :class:`QArray`.

    Args:
      x: a floating-point tensor.
      spec: the quantizer.
      key: a PRNG key, required when ``spec.rounding == 'stochastic'``.
      qparams: precomputed (e.g. static, calibrated) parameters; calibrated from ``x`` if omitted.
    """
    x32, block = _prepare(x, spec)
    last = x32.shape[-1] if x32.ndim else 1
    if isinstance(spec.format, CodebookFormat):
        codebook, idx = _kmeans(x32, spec, block)
        return QArray(pack_values(idx, spec), None, None, None, codebook, spec, last)
    qp = _params(x32, spec, block, qparams)
    values = encode(x32, spec, qp, noise_for(key, x32.shape, spec))
    return QArray(pack_values(values, spec), qp.scale, qp.zero_point, qp.tensor_scale, None, spec, last)


def dequantize(q: QArray, dtype: jnp.dtype | type = jnp.float32) -> jax.Array:
    """The real values a :class:`QArray` stands for, as ``dtype``."""
    if not isinstance(q, QArray):
        raise TypeError(f"dequantize needs a qjax.QArray; got {type(q).__name__}")
    values = q.values
    if q.codebook is not None:
        block = tiling.block_shape(values.shape, q.spec)
        flat = kmeans.lookup(q.codebook, tiling.blocks_last(values, block))
        return tiling.unblocks_last(flat, values.shape, block).astype(dtype)
    return decode(values, q.spec, q.qparams).astype(dtype)


def quantize_dequantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    qparams: QParams | None = None,
) -> jax.Array:
    """``dequantize(quantize(x, spec))`` without storing: the simulated path, in ``x.dtype``."""
    x32, block = _prepare(x, spec)
    if isinstance(spec.format, CodebookFormat):
        codebook, idx = _kmeans(x32, spec, block)
        flat = kmeans.lookup(codebook, tiling.blocks_last(idx, block))
        return tiling.unblocks_last(flat, x32.shape, block).astype(jnp.result_type(x))
    qp = _params(x32, spec, block, qparams)
    values = encode(x32, spec, qp, noise_for(key, x32.shape, spec))
    return decode(values, spec, qp).astype(jnp.result_type(x))
