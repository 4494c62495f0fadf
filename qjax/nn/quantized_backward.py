"""Quantized backward contractions: dL/dx and dL/dW on low-precision operands.

A quantized layer computes :math:`y = a \\cdot b` (a ``dot_general``, an einsum or a convolution of
its input :math:`a` and kernel :math:`b`, each possibly fake-quantized in the forward pass). Its
backward pass is two more contractions of the incoming gradient :math:`g = \\partial L/\\partial y`:

.. math::

    \\frac{\\partial L}{\\partial a} = g \\cdot b^\\top, \\qquad
    \\frac{\\partial L}{\\partial b} = a^\\top \\cdot g .

With a :class:`GradientSpec`, each selected one runs on a quantized pair: :math:`g` encoded in
``dtype`` (nearest or stochastic rounding) and the saved operand (:math:`b` in dL/da, :math:`a` in
dL/db) in ``residual_dtype``, both symmetric (:math:`Z = 0`), so that

.. math::

    \\frac{\\partial L}{\\partial a} \\approx \\sum_n S_g S_b\\, q_g q_b

is an int8 x int8 -> int32 (or fp8 x fp8 -> f32) contraction followed by a scaling. The scales
are chosen where they factor out of that sum. For a ``dot_general`` or einsum each backward
contraction is laid out as a batched matmul over one contracted axis,
:math:`(B, R, K) \\cdot (B, C, K) \\to (B, R, C)`, and

* ``per_tensor``: one scale per operand;
* ``per_channel``: one scale per row :math:`(B, R)` of each operand (for dL/da: per token of
  :math:`g` and per input feature of the kernel; for dL/db: per input feature of :math:`a` and
  per output feature of :math:`g`);
* ``per_block``: one scale per tile of ``block_size`` elements along :math:`K` (1 x 128 tiles),
  the kernel in ``block_size`` x ``block_size`` blocks (as DeepSeek-V3); :math:`K` (and the
  kernel's rows) are zero-padded to a multiple of ``block_size``, which changes no sum.

A convolution's backward contractions are transposed convolutions; they take ``per_tensor`` and
``per_channel`` (channels last: :math:`g` per example in dL/da and per output channel in dL/db,
the kernel and the input per input channel), computed in float on the quantized values.

Stochastic rounding of :math:`g`, :math:`\\lfloor g/S + u \\rfloor` with
:math:`u \\sim U[0, 1)`, makes each product unbiased in :math:`g`:
:math:`\\mathbb{E}[S\\,q_g] = g` wherever :math:`g` is inside the format's range. Its key is
an argument of the contraction, so a training step threads it (the layer's ``quantize`` stream).

Scales are *current* (each tensor's own absolute maximum) or, with a history of length
:math:`H > 0` (``per_tensor`` only), *delayed* (Transformer Engine):
:math:`S = \\max(h_1..h_H) / q_{max}` from the last :math:`H` steps' absolute maxima, values
beyond it saturating; the first step (an empty history) uses the current maximum. The gradient's
history enters the contraction as an argument whose cotangent is the updated history
(:math:`h \\leftarrow (\\max|g|, h_1, .., h_{H-1})`): a train step overwrites the variable with
it (:class:`GradientAmaxHistory`, :func:`qjax.training.make_train_step`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from qjax.kernels.xla import DimensionNumbers, Operand, contract, int8_operand
from qjax.numerics import QParams, QuantSpec, tiling
from qjax.numerics.calibration import block_range
from qjax.numerics.fields import SpecError, SpecTypeError, parse_enum, reject_unknown_fields
from qjax.numerics.formats import FloatFormat, IntFormat, parse_format
from qjax.numerics.quantize import decode, encode, noise_for
from qjax.numerics.rounding import Rounding


class GradientGranularity(enum.StrEnum):
    """Which elements of a backward contraction's operands share a scale (module docstring)."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_BLOCK = "per_block"


class Contraction(enum.StrEnum):
    """The backward contractions of a layer: dL/d(input) and dL/d(kernel)."""

    INPUT = "input"
    KERNEL = "kernel"


_LOW_PRECISION = "int2..int8 or float8_e4m3fn / float8_e5m2"


def _check_dtype(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise SpecTypeError(
            f"GradientSpec {name}={value!r} must be a format name ({_LOW_PRECISION})", field=name
        )
    try:
        fmt = parse_format(value)
    except SpecError as e:
        raise SpecError(f"GradientSpec {name}: {e}", field=name) from None
    ok = (isinstance(fmt, IntFormat) and fmt.signed) or (
        isinstance(fmt, FloatFormat) and fmt.container_bits == 8
    )
    if not ok:
        raise SpecError(
            f"GradientSpec {name}={value!r}: a backward contraction runs on signed integers or fp8; "
            f"use {_LOW_PRECISION}",
            field=name,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientSpec:
    """How a layer's backward contractions are quantized (see the module docstring).

    A bad field raises :class:`~qjax.numerics.fields.SpecError` whose ``field`` names it.

    Attributes:
      dtype: the incoming gradient's format: ``int2..int8``, ``float8_e4m3fn`` or ``float8_e5m2``.
      residual_dtype: the saved operand's format in each backward contraction (the kernel in
        dL/d(input), the input in dL/d(kernel)); ``None``: ``dtype``.
      granularity: ``per_tensor``, ``per_channel`` or ``per_block`` (``block_size`` tiles).
      block_size: the tile along the contraction of ``per_block``.
      rounding: of the gradient: ``nearest`` or ``stochastic`` (unbiased; needs the layer's key).
        The saved operand is rounded to nearest.
      contractions: which backward contractions are quantized: ``input`` (dL/dx), ``kernel``
        (dL/dW), or both; the others run in float.
    """

    dtype: str = "int8"
    residual_dtype: str | None = None
    granularity: GradientGranularity | str = GradientGranularity.PER_TENSOR
    block_size: int = 128
    rounding: Rounding | str = Rounding.NEAREST
    contractions: tuple[Contraction | str, ...] = (Contraction.INPUT, Contraction.KERNEL)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        _check_dtype("dtype", self.dtype)
        if self.residual_dtype is not None:
            _check_dtype("residual_dtype", self.residual_dtype)
        set_("granularity", parse_enum(GradientGranularity, self.granularity, "granularity"))
        if self.rounding not in (Rounding.NEAREST, Rounding.STOCHASTIC):
            raise SpecError(
                f"GradientSpec rounding={self.rounding!r} must be 'nearest' or 'stochastic'", field="rounding"
            )
        set_("rounding", Rounding(self.rounding))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise SpecError(
                f"GradientSpec block_size={self.block_size!r} must be a positive integer (e.g. 128)",
                field="block_size",
            )
        contractions = (self.contractions,) if isinstance(self.contractions, str) else self.contractions
        parsed = tuple(parse_enum(Contraction, c, "contractions") for c in contractions)
        if not parsed or len(set(parsed)) != len(parsed):
            raise SpecError(
                f"GradientSpec contractions={self.contractions!r} must name 'input', 'kernel' or both, "
                "each once",
                field="contractions",
            )
        set_("contractions", parsed)

    @property
    def grad_spec(self) -> QuantSpec:
        return QuantSpec(dtype=self.dtype, rounding=self.rounding)

    @property
    def residual_spec(self) -> QuantSpec:
        return QuantSpec(dtype=self.residual_dtype or self.dtype)

    @classmethod
    def from_dict(cls, d: Any) -> GradientSpec:
        reject_unknown_fields("GradientSpec", sorted(d), sorted(f.name for f in dataclasses.fields(cls)))
        return cls(**d)


class AmaxHistory(nnx.Variable):
    """Delayed scaling: the last :math:`H` absolute maxima of a layer's input and kernel,
    newest first (updated by the forward pass; not trained)."""


class GradientAmaxHistory(nnx.Variable):
    """Delayed scaling: the last :math:`H` absolute maxima of a layer's incoming gradient, newest
    first. The backward pass returns the updated history as this variable's gradient; a train
    step overwrites the variable with it (never an optimizer update). A layer called more than once
    in a step (shared weights) would get the sum of its calls' histories: delayed scaling assumes
    one call per step."""


# -- delayed scaling --------------------------------------------------------------------------------


def delayed_qparams(history: jax.Array, current_amax: jax.Array, spec: QuantSpec) -> QParams:
    """Per-tensor parameters from the largest of the ``history`` maxima (the current maximum while
    the history is still empty)."""
    amax = jnp.max(history)
    amax = jnp.where(amax > 0, amax, current_amax).astype(jnp.float32)
    qp = spec.affine_format.qparams(-amax, amax, True)
    return jax.tree_util.tree_map(jax.lax.stop_gradient, qp)


def pushed(history: jax.Array, amax: jax.Array) -> jax.Array:
    """``history`` with ``amax`` in front and its oldest entry dropped."""
    return jnp.concatenate([amax.reshape(1).astype(history.dtype), history[:-1]])


def amax_of(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


# -- operands -----------------------------------------------------------------------------------------


def low_precision_operand(
    x32: jax.Array, spec: QuantSpec, qp: QParams | None = None, noise: jax.Array | None = None
) -> Operand:
    """float32 ``x32`` encoded by symmetric ``spec`` into int8 or fp8 values with their scale grid
    (``qp``: fixed parameters; ``None``: calibrated from ``x32``)."""
    if qp is None:
        lo, hi = block_range(x32, spec, tiling.block_shape(x32.shape, spec))
        qp = spec.affine_format.qparams(lo, hi, True)
    qp = jax.tree_util.tree_map(jax.lax.stop_gradient, qp)
    values = encode(x32, spec, qp, noise)
    fmt = spec.format
    if isinstance(fmt, IntFormat):
        return int8_operand(values, None, qp.scale, fmt.signed)
    return Operand(values.astype(fmt.value_dtype), None, qp.scale.astype(jnp.float32))


def _canonical(
    t: jax.Array, batch: Sequence[int], rows: Sequence[int], contracted: Sequence[int]
) -> jax.Array:
    """``t`` transposed to (batch, rows, contracted) axes and reshaped to three axes."""
    shape = tuple(math.prod(t.shape[a] for a in axes) for axes in (batch, rows, contracted))
    return jnp.transpose(t, (*batch, *rows, *contracted)).reshape(shape)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _spec3(base: QuantSpec, spec: GradientSpec, kernel_rows: bool) -> QuantSpec:
    """``base`` with the granularity of a canonical (B, R, K) operand contracted over K."""
    g = spec.granularity
    if g == GradientGranularity.PER_TENSOR:
        return base
    if g == GradientGranularity.PER_CHANNEL:
        return dataclasses.replace(base, granularity="per_channel", axis=(0, 1))
    if kernel_rows:
        return dataclasses.replace(
            base, granularity="per_block", block_shape=(spec.block_size, spec.block_size)
        )
    return dataclasses.replace(base, granularity="per_group", axis=2, group_size=spec.block_size)


def canonical_contraction(
    lhs: jax.Array,
    rhs: jax.Array,
    spec: GradientSpec,
    *,
    grad_side: str,
    kernel_side: str | None,
    key: jax.Array | None,
    grad_qparams: QParams | None,
) -> jax.Array:
    """``(B, R, K) . (B, C, K) -> (B, R, C)`` float32 on quantized operands: the gradient is the
    ``grad_side`` operand (``"lhs"`` or ``"rhs"``); ``kernel_side`` names the operand that is a
    kernel (blocks under ``per_block``), if any."""
    r, c = lhs.shape[1], rhs.shape[1]
    per_block = spec.granularity == GradientGranularity.PER_BLOCK
    ops = []
    for side, x in (("lhs", lhs), ("rhs", rhs)):
        x = x.astype(jnp.float32)
        is_kernel = side == kernel_side
        if per_block:
            x = _pad_to(x, 2, spec.block_size)
            if is_kernel:
                x = _pad_to(x, 1, spec.block_size)
        if side == grad_side:
            q = _spec3(spec.grad_spec, spec, False)
            noise = noise_for(key, x.shape, q)
            ops.append(low_precision_operand(x, q, grad_qparams, noise))
        else:
            ops.append(low_precision_operand(x, _spec3(spec.residual_spec, spec, is_kernel)))
    out = contract(ops[0], ops[1], (((2,), (2,)), ((0,), (0,))))
    return out[:, :r, :c]


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def dot_backward(
    g: jax.Array,
    a: jax.Array,
    b: jax.Array,
    dn: DimensionNumbers,
    spec: GradientSpec,
    key: jax.Array | None,
    history: jax.Array | None = None,
    rhs_kernel: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """``(dL/da, dL/db)`` of ``y = dot_general(a, b, dn)`` from ``g = dL/dy``, float32, each
    selected contraction on quantized operands (module docstring), the others in float;
    ``history``: the gradient's amax history (delayed scaling) or ``None`` (current scaling);
    ``rhs_kernel``: ``b`` is a kernel (``per_block``: blocks; else, as attention's keys and
    values, 1 x ``block_size`` tiles like ``a``)."""
    grad_qparams = _grad_qparams(spec, g, history)
    (lc, rc), (lb, rb) = dn
    lc, rc, lb, rb = (
        tuple(int(i) % n for i in ax) for ax, n in ((lc, a.ndim), (rc, b.ndim), (lb, a.ndim), (rb, b.ndim))
    )
    lf = tuple(i for i in range(a.ndim) if i not in lc and i not in lb)
    rf = tuple(i for i in range(b.ndim) if i not in rc and i not in rb)
    nb = len(lb)
    gb = tuple(range(nb))
    glf = tuple(range(nb, nb + len(lf)))
    grf = tuple(range(nb + len(lf), g.ndim))
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    g = g.astype(jnp.float32)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    grads = []
    # dL/da = g (B, lhs free, rhs free) . b (B, rhs contracted, rhs free) over rhs free
    if Contraction.INPUT in spec.contractions:
        out = canonical_contraction(
            _canonical(g, gb, glf, grf),
            _canonical(b32, rb, rc, rf),
            spec,
            grad_side="lhs",
            kernel_side="rhs" if rhs_kernel else None,
            key=keys[0],
            grad_qparams=grad_qparams,
        )
        shape = (*(a.shape[i] for i in lb), *(a.shape[i] for i in lf), *(a.shape[i] for i in lc))
        grads.append(jnp.transpose(out.reshape(shape), _inverse((*lb, *lf, *lc))))
    else:
        grads.append(jax.vjp(lambda x: jax.lax.dot_general(x, b32, dn), a32)[1](g)[0])
    # dL/db = a (B, lhs contracted, lhs free) . g (B, rhs free, lhs free) over lhs free
    if Contraction.KERNEL in spec.contractions:
        out = canonical_contraction(
            _canonical(a32, lb, lc, lf),
            _canonical(g, gb, grf, glf),
            spec,
            grad_side="rhs",
            kernel_side=None,
            key=keys[1],
            grad_qparams=grad_qparams,
        )
        shape = (*(b.shape[i] for i in rb), *(b.shape[i] for i in rc), *(b.shape[i] for i in rf))
        grads.append(jnp.transpose(out.reshape(shape), _inverse((*rb, *rc, *rf))))
    else:
        grads.append(jax.vjp(lambda w: jax.lax.dot_general(a32, w, dn), b32)[1](g)[0])
    return grads[0], grads[1]


def _fake(
    x: jax.Array, spec: QuantSpec, qp: QParams | None = None, noise: jax.Array | None = None
) -> jax.Array:
    """``x`` (float32) quantized and decoded by ``spec``."""
    if qp is None:
        lo, hi = block_range(x, spec, tiling.block_shape(x.shape, spec))
        qp = spec.affine_format.qparams(lo, hi, True)
    return decode(encode(x, spec, qp, noise), spec, qp)


def conv_backward(
    g: jax.Array,
    a: jax.Array,
    b: jax.Array,
    conv: Callable[[jax.Array, jax.Array], jax.Array],
    spec: GradientSpec,
    key: jax.Array | None,
    history: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(dL/da, dL/db)`` of ``y = conv(a, b)`` (channels last: input ``(N, ..., C)``, kernel
    ``(..., C, O)``, output ``(N, ..., O)``), the selected transposed convolutions on quantized
    operands (``per_tensor`` or ``per_channel``), computed in float32 on their values."""
    grad_qparams = _grad_qparams(spec, g, history)
    if spec.granularity == GradientGranularity.PER_BLOCK:
        raise ValueError(
            "a convolution's backward contractions take gradient granularity 'per_tensor' or "
            "'per_channel', not 'per_block'; give the convolutions a rule of their own"
        )
    per_channel = spec.granularity == GradientGranularity.PER_CHANNEL
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    g, a32, b32 = g.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32)

    def fq(
        x: jax.Array, base: QuantSpec, axis: int | None, k: jax.Array | None, qp: QParams | None
    ) -> jax.Array:
        s = (
            base
            if axis is None or not per_channel
            else dataclasses.replace(base, granularity="per_channel", axis=axis)
        )
        return _fake(x, s, qp if s is base else None, noise_for(k, x.shape, s))

    gq, rq = spec.grad_spec, spec.residual_spec
    if Contraction.INPUT in spec.contractions:
        g_in = fq(g, gq, 0, keys[0], grad_qparams)  # per example
        da = jax.vjp(lambda x: conv(x, fq(b32, rq, b.ndim - 2, None, None)), a32)[1](g_in)[0]
    else:
        da = jax.vjp(lambda x: conv(x, b32), a32)[1](g)[0]
    if Contraction.KERNEL in spec.contractions:
        g_k = fq(g, gq, g.ndim - 1, keys[1], grad_qparams)  # per output channel
        db = jax.vjp(lambda w: conv(fq(a32, rq, a.ndim - 1, None, None), w), b32)[1](g_k)[0]
    else:
        db = jax.vjp(lambda w: conv(a32, w), b32)[1](g)[0]
    return da, db


# -- the contraction with a quantized backward pass -------------------------------------------------


def _grad_qparams(spec: GradientSpec, g: jax.Array, history: jax.Array | None) -> QParams | None:
    if history is None:
        return None
    return delayed_qparams(history, amax_of(g), spec.grad_spec)


def history_cotangent(g: jax.Array, history: jax.Array | None) -> jax.Array | None:
    """The updated gradient amax history (the cotangent of ``history``), or ``None``."""
    return None if history is None else pushed(history, amax_of(g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def quantized_backward_dot(dn: DimensionNumbers, spec: GradientSpec, rhs_kernel: bool, a, b, key, history):  # type: ignore[no-untyped-def]
    """``dot_general(a, b, dn)`` whose backward contractions are quantized by ``spec``
    (``rhs_kernel``: see :func:`dot_backward`); ``history``: the gradient's amax history (delayed
    scaling) or ``None`` (current)."""
    return jax.lax.dot_general(a, b, dn)


def _qbd_fwd(dn, spec, rhs_kernel, a, b, key, history):  # type: ignore[no-untyped-def]
    return jax.lax.dot_general(a, b, dn), (a, b, key, history)


def _qbd_bwd(dn, spec, rhs_kernel, res, g):  # type: ignore[no-untyped-def]
    a, b, key, history = res
    da, db = dot_backward(g, a, b, dn, spec, key, history, rhs_kernel)
    return da.astype(a.dtype), db.astype(b.dtype), None, history_cotangent(g, history)


quantized_backward_dot.defvjp(_qbd_fwd, _qbd_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def quantized_backward_conv(conv, spec: GradientSpec, a, b, key, history):  # type: ignore[no-untyped-def]
    """``conv(a, b)`` whose backward contractions are quantized by ``spec`` (channels last)."""
    return conv(a, b)


def _qbc_fwd(conv, spec, a, b, key, history):  # type: ignore[no-untyped-def]
    return conv(a, b), (a, b, key, history)


def _qbc_bwd(conv, spec, res, g):  # type: ignore[no-untyped-def]
    a, b, key, history = res
    da, db = conv_backward(g, a, b, conv, spec, key, history)
    return da.astype(a.dtype), db.astype(b.dtype), None, history_cotangent(g, history)


quantized_backward_conv.defvjp(_qbc_fwd, _qbc_bwd)
