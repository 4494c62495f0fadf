"""QAT with an integer forward pass: the fake-quantized contraction computed in int8.

For integer activations and kernels with straight-through estimators, the forward value of
``dot_general(Q(x), Q(w))`` equals ``S_x S_w [q_x q_w - ...]`` (see :mod:`qjax.kernels.xla`) up to
float rounding, and the int8 x int8 -> int32 contraction is the faster one on hardware with
integer units. The backward pass is that of the simulated path,

.. math::

    \\frac{\\partial L}{\\partial x} = m_x \\odot \\Big(g \\cdot Q(w)^\\top\\Big), \\qquad
    \\frac{\\partial L}{\\partial w} = m_w \\odot \\Big(Q(x)^\\top \\cdot g\\Big),

with :math:`m = 1` for ``ste`` and, for ``clipped_ste``, its mask (where clipping left the code
unchanged; :mod:`qjax.ste`). The int8 operands are the residuals (a quarter of the float bytes);
:math:`Q(x)`, :math:`Q(w)` are rebuilt from them in the backward pass. With
``residuals="original"`` the backward pass uses the float operands ``x``, ``w`` instead of
``Q(x)``, ``Q(w)`` (cheaper; the choice Qwix's ``QtProvider`` makes by default for forward-only
quantization), which is no longer the exact gradient of the simulated network.
"""

from __future__ import annotations

import enum
import functools
from typing import Any

import jax
import jax.numpy as jnp

from qjax.kernels.xla import DimensionNumbers, Operand, contract, int8_operand, to_output
from qjax.nn.quantized_backward import GradientSpec, dot_backward, history_cotangent, low_precision_operand
from qjax.numerics import QParams, QuantSpec, tiling
from qjax.numerics.calibration import block_range
from qjax.numerics.formats import FloatFormat, IntFormat
from qjax.numerics.quantize import encode, noise_for, unclipped
from qjax.ste import Estimator, estimator_impl


class Residuals(enum.StrEnum):
    """What the backward pass of the integer forward contracts the cotangent with."""

    QUANTIZED = "quantized"  # Q(x), Q(w): the exact gradient of the simulated network
    ORIGINAL = "original"  # the float x, w: cheaper (Qwix's default for forward-only QAT)


STATELESS = (Estimator.STE, Estimator.CLIPPED_STE)


def _fp8(spec: QuantSpec) -> bool:
    fmt = spec.format
    return isinstance(fmt, FloatFormat) and fmt.container_bits == 8


def supports_integer_forward(
    weights: QuantSpec | None, activations: QuantSpec | None, estimators: tuple[str, str]
) -> bool:
    """Both operands integer (any width up to 8 bits) or both fp8 (``float8_e4m3fn`` /
    ``float8_e5m2``, contracted fp8 x fp8 -> f32), and both estimators stateless (``ste``,
    ``clipped_ste``, or a plug-in registered with ``integer_forward=True``, replayed as ``ste``)."""
    if weights is None or activations is None:
        return False
    ints = isinstance(weights.format, IntFormat) and isinstance(activations.format, IntFormat)
    return (ints or (_fp8(weights) and _fp8(activations))) and all(
        estimator_impl(e).integer_forward for e in estimators
    )


def _qparams(x: jax.Array, spec: QuantSpec, qparams: QParams | None) -> QParams:
    if qparams is None:
        x32 = x.astype(jnp.float32)
        lo, hi = block_range(x32, spec, tiling.block_shape(x.shape, spec))
        qparams = spec.affine_format.qparams(lo, hi, spec.symmetric)
    return jax.tree_util.tree_map(jax.lax.stop_gradient, qparams)


def integer_forward_dot(
    x: jax.Array,
    w: jax.Array,
    dimension_numbers: DimensionNumbers,
    *,
    activations: QuantSpec,
    weights: QuantSpec,
    activation_estimator: str,
    weight_estimator: str,
    activation_qparams: QParams | None = None,
    weight_qparams: QParams | None = None,
    keys: tuple[jax.Array | None, jax.Array | None] = (None, None),
    residuals: Residuals | str = Residuals.QUANTIZED,
    gradients: GradientSpec | None = None,
    gradient_key: jax.Array | None = None,
    gradient_history: jax.Array | None = None,
) -> jax.Array:
    """``dot_general(Q(x), Q(w))`` evaluated in int8 (or fp8), differentiated as the simulated
    path; with ``gradients``, the backward contractions quantized
    (:mod:`qjax.nn.quantized_backward`; ``gradient_key`` for stochastic rounding,
    ``gradient_history`` for delayed scaling)."""
    if residuals not in (Residuals.QUANTIZED, Residuals.ORIGINAL):
        raise ValueError(f"residuals={residuals!r} must be 'quantized' or 'original'")
    sides = (
        (activations, activation_estimator),
        (weights, weight_estimator),
        Residuals(residuals),
        gradients,
    )
    qp_x = _qparams(jax.lax.stop_gradient(x), activations, activation_qparams)
    qp_w = _qparams(jax.lax.stop_gradient(w), weights, weight_qparams)
    noise = (noise_for(keys[0], x.shape, activations), noise_for(keys[1], w.shape, weights))
    return _integer_dot(dimension_numbers, sides, x, w, qp_x, qp_w, noise, gradient_key, gradient_history)


def _operand(x: jax.Array, spec: QuantSpec, qp: QParams, noise: jax.Array | None) -> Operand:
    fmt = spec.format
    if not isinstance(fmt, IntFormat):  # fp8
        return low_precision_operand(x.astype(jnp.float32), spec, qp, noise)
    values = encode(x.astype(jnp.float32), spec, qp, noise)
    return int8_operand(values, qp.zero_point, qp.scale, fmt.signed)


def _dequantize(op: Operand) -> jax.Array:
    """``scale * (values - zero_point)`` with the grids repeated over their blocks."""
    shape = op.values.shape
    grid = lambda p: p if p.ndim else p.reshape((1,) * len(shape))
    scale = grid(op.scale)
    block = tuple(n // g for n, g in zip(shape, scale.shape, strict=True))
    real = op.values.astype(jnp.float32)
    if op.zero_point is not None:
        real = real - tiling.per_element(grid(op.zero_point).astype(jnp.float32), shape, block)
    return real * tiling.per_element(scale, shape, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _integer_dot(dn: DimensionNumbers, sides: Any, x, w, qp_x, qp_w, noise, g_key, g_history):  # type: ignore[no-untyped-def]
    (spec_x, _), (spec_w, _), _, _ = sides
    out = contract(_operand(x, spec_x, qp_x, noise[0]), _operand(w, spec_w, qp_w, noise[1]), dn)
    return out.astype(jnp.result_type(x))


def _mask(
    x: jax.Array, spec: QuantSpec, estimator: str, qp: QParams, noise: jax.Array | None
) -> jax.Array | None:
    if estimator != Estimator.CLIPPED_STE:
        return None
    return unclipped(x.astype(jnp.float32), spec, qp, noise)


def _integer_dot_fwd(dn, sides, x, w, qp_x, qp_w, noise, g_key, g_history):  # type: ignore[no-untyped-def]
    (spec_x, est_x), (spec_w, est_w), residuals, _ = sides
    x_op, w_op = _operand(x, spec_x, qp_x, noise[0]), _operand(w, spec_w, qp_w, noise[1])
    out = contract(x_op, w_op, dn).astype(jnp.result_type(x))
    masks = (_mask(x, spec_x, est_x, qp_x, noise[0]), _mask(w, spec_w, est_w, qp_w, noise[1]))
    dtypes = (jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))
    operands = (x_op, w_op) if residuals == Residuals.QUANTIZED else (x, w)
    return out, (*operands, masks, dtypes, g_key, g_history)


def _rebuilt(
    op: Operand, contracted: tuple[int, ...], cotangent_size: int
) -> tuple[jax.Array, jax.Array | None]:
    """``Q(op)`` for the backward contraction, as ``(values, scale)``: where the scale is constant
    along ``contracted`` and ``Z = 0`` it may move onto the cotangent instead
    (:math:`g \\cdot (v s)^\\top = (g s) \\cdot v^\\top`); it goes to the smaller of the two, so
    the elementwise pass runs over fewer elements. ``scale`` is ``None`` when the values are
    already dequantized."""
    scale = op.scale
    movable = op.zero_point is None and (scale.ndim == 0 or all(scale.shape[a] == 1 for a in contracted))
    if movable and op.values.size > cotangent_size:
        return op.values.astype(jnp.float32), scale
    return _dequantize(op), None


def _integer_dot_bwd(dn, sides, res, g):  # type: ignore[no-untyped-def]
    x_op, w_op, masks, dtypes, g_key, g_history = res
    (lc, rc), _ = dn
    gradients = sides[3]
    if gradients is not None:  # quantized backward contractions, of the residuals' real values
        real = lambda op: op.astype(jnp.float32) if sides[2] == Residuals.ORIGINAL else _dequantize(op)
        grads = dot_backward(g, real(x_op), real(w_op), dn, gradients, g_key, g_history)
        return (*_masked(grads, masks, dtypes), None, None, None, None, history_cotangent(g, g_history))
    if sides[2] == Residuals.ORIGINAL:
        (x_val, x_scale), (w_val, w_scale) = (
            (x_op.astype(jnp.float32), None),
            (w_op.astype(jnp.float32), None),
        )
    else:
        x_val, x_scale = _rebuilt(x_op, lc, g.size)
        w_val, w_scale = _rebuilt(w_op, rc, g.size)
    shapes = (x_val.shape, w_val.shape)
    # the two contractions run in the float layer's compute type (bf16 for a bf16 layer, as its
    # float backward would; f32 for f32), the scales applied in f32 before the cast
    compute = jnp.result_type(*dtypes, g)
    x_val, w_val = x_val.astype(compute), w_val.astype(compute)
    g = g.astype(jnp.float32)

    def scaled(scale: jax.Array | None, side: str) -> jax.Array:
        if scale is None:
            return g.astype(compute)
        grid = scale if scale.ndim else scale.reshape((1,) * len(shapes[side == "rhs"]))
        return (g * to_output(grid, side, *shapes, dn)).astype(compute)

    g_x = jax.vjp(lambda a: jax.lax.dot_general(a, w_val, dn), x_val)[1](scaled(w_scale, "rhs"))[0]
    g_w = jax.vjp(lambda b: jax.lax.dot_general(x_val, b, dn), w_val)[1](scaled(x_scale, "lhs"))[0]
    return (*_masked((g_x, g_w), masks, dtypes), None, None, None, None, None)


def _masked(grads: Any, masks: Any, dtypes: Any) -> tuple[jax.Array, ...]:
    return tuple(
        (gr if m is None else jnp.where(m, gr, 0.0)).astype(d.dtype)
        for gr, m, d in zip(grads, masks, dtypes, strict=True)
    )


_integer_dot.defvjp(_integer_dot_fwd, _integer_dot_bwd)
