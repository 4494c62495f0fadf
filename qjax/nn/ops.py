"""The quantized contraction a layer calls through its own hook.

``nnx.Linear.dot_general``, ``nnx.Conv.conv_general_dilated`` and ``nnx.Einsum.einsum_op`` are
injectable; a :class:`QuantizedContraction` is installed there, so the layer object, its code and
its variable paths stay Flax's own. The op owns the quantizer state its rule uses: learned LSQ
scales, LSQ+ offsets, PACT clips and k-means centroids (``nnx.Param``), fixed k-means cluster
indices (:class:`CodebookIndices`), calibration statistics (:class:`~qjax.nn.stats.QuantStats`)
and static activation parameters; an op with state is a :class:`QuantizedOp` (an ``nnx.Module``),
one without (dynamic scales, a stateless estimator) a :class:`FrozenQuantizedOp`, a static value
that adds no node to the module graph. Its ``mode`` decides what a call does:

* ``qat``: fake-quantize input and kernel with the rule's estimators, contract in float (with
  ``weight_estimator='kmeans_finetune'`` the kernel is ``centroids[indices]``, and the layer's
  own float kernel is not used);
* ``calibrate``: record input statistics, contract in float;
* ``serve``: quantize the input (dynamic or static scales), contract it with the stored ``QArray``
  kernel through :mod:`qjax.kernels` (int8 x int8 -> int32, fp8, or weight-only).

``nnx.Embed`` has no contraction hook; :class:`QuantizedEmbedding` is installed as its
``promote_dtype`` hook and quantizes the table (weight-only).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import flax.nnx as nnx
import jax
import jax.numpy as jnp
from flax.nnx.nn.dtypes import promote_dtype

from qjax import kernels
from qjax.nn.hooks import OpKind, layer_hook
from qjax.nn.integer_qat import integer_forward_dot, supports_integer_forward
from qjax.nn.quantized_backward import (
    AmaxHistory,
    GradientAmaxHistory,
    amax_of,
    delayed_qparams,
    pushed,
    quantized_backward_conv,
    quantized_backward_dot,
)
from qjax.nn.rules import ActivationScale, Rule
from qjax.nn.stats import QuantStats, StaticQParams, init_stats, needs_statistics, update_stats
from qjax.numerics import QArray, QParams, QuantSpec, dequantize, quantize, quantize_dequantize
from qjax.numerics.calibration import check_finite
from qjax.numerics.fields import parse_enum
from qjax.numerics.formats import IntFormat
from qjax.numerics.qarray import pack_values
from qjax.numerics.rounding import needs_key
from qjax.numerics.spec import Granularity
from qjax.ste import Estimator, codebook_weight, estimator_impl, fake_quant, lsq_init_scale, lsq_plus_qparams


class Mode(enum.StrEnum):
    """What a quantized layer's call does (see the module docstring). ``convert`` is a request to
    :func:`qjax.nn.quantize_model` only: the layers it converts are in ``serve``."""

    QAT = "qat"
    CALIBRATE = "calibrate"
    SERVE = "serve"
    CONVERT = "convert"


MODES: tuple[str, ...] = (Mode.QAT.value, Mode.CALIBRATE.value, Mode.SERVE.value)  # a layer's modes


# one compiled program per (spec, shape): run eagerly, each primitive of quantize (k-means
# included) compiles on its own, which made converting a fresh model take seconds
_jit_quantize = jax.jit(quantize, static_argnums=1)


class CodebookIndices(nnx.Variable):
    """The fixed cluster index of every weight of a k-means fine-tuned layer (uint8, not trained)."""


def init_codebook(kernel: jax.Array, spec: QuantSpec) -> tuple[nnx.Param, CodebookIndices]:
    """k-means of ``kernel`` (as :func:`qjax.quantize` runs it): trainable centroids, shape
    ``grid + (2**bits,)``, and fixed indices, the kernel's shape."""
    check_finite(kernel, "kernel")  # a no-op under jit: check before
    q = _jit_quantize(kernel, spec)
    assert q.codebook is not None
    return nnx.Param(q.codebook), CodebookIndices(q.values.astype(jnp.uint8))


def codebook_qarray(centroids: jax.Array, indices: jax.Array, spec: QuantSpec) -> QArray:
    """The stored form of a fine-tuned codebook weight: packed indices and the trained centroids."""
    last = indices.shape[-1] if indices.ndim else 1
    return QArray(pack_values(indices, spec), None, None, None, centroids.astype(jnp.float32), spec, last)


def _codebook_state(
    rule: Rule, kernel: jax.Array | None, path: str
) -> tuple[nnx.Param | None, CodebookIndices | None]:
    if rule.weights is None or rule.weight_estimator != Estimator.KMEANS_FINETUNE or kernel is None:
        return None, None
    try:
        return init_codebook(kernel, rule.weights)
    except ValueError as e:
        raise ValueError(f"layer {path!r} (k-means of the kernel): {e}") from None


class KernelLayout(nnx.Variable):
    """A served layer's weight in its kernel's layout (e.g. the W4A16 kernel's
    :class:`~qjax.kernels.w4a16.PackedW4`), made once by :func:`qjax.nn.prepare_kernels`."""


class QuantizedContraction:
    """A layer's quantized contraction (see the module docstring): what its hook computes, from
    the fields below and the quantizer state it holds. It takes one of two forms:
    :class:`QuantizedOp`, an ``nnx.Module`` holding quantizer state, and
    :class:`FrozenQuantizedOp`, an immutable value for a layer that holds none;
    :func:`install_op` picks the form.

    Attributes:
      kind: :class:`~qjax.nn.hooks.OpKind` ``dot_general``, ``conv``, ``einsum`` or
        ``conv_transpose`` (installed as ``promote_dtype``): which hook of the layer this replaces.
      path: the layer's path in the model (for error messages and reports).
      rule: the :class:`~qjax.nn.Rule` that selected the layer.
      mode: :class:`Mode` ``qat``, ``calibrate`` or ``serve``.
      prepared: ``None``, or in ``serve`` mode the weight in its kernel's layout
        (:func:`qjax.nn.prepare_kernels`).

    The quantizer state is held only where the rule uses it: calibration statistics (``stats``)
    for static activation scales and for learned activation quantizers (LSQ, LSQ+, PACT), which
    calibration initialises (:func:`~qjax.nn.stats.needs_statistics`); ``static`` for static
    activation scales; ``weight_static`` once a method pins the weight grid
    (:func:`qjax.nn.model.pin_weight_qparams`); ``rngs`` for stochastic rounding and noisy
    estimators; ``prepared`` once :func:`qjax.nn.prepare_kernels` stores a kernel layout. Absent
    state reads as ``None`` (these class attributes) and is no node of the module graph.
    """

    kind: OpKind
    path: str
    rule: Rule
    mode: Mode
    weight_scale: nnx.Param | None = None
    centroids: nnx.Param | None = None
    indices: CodebookIndices | None = None
    stats: QuantStats | None = None
    act_scale: nnx.Param | None = None
    act_offset: nnx.Param | None = None
    act_clip: nnx.Param | None = None
    static: StaticQParams | None = None
    weight_static: StaticQParams | None = None
    rngs: nnx.Rngs | None = None
    amax_history: AmaxHistory | None = None
    gradient_history: GradientAmaxHistory | None = None
    prepared: KernelLayout | None = None

    # -- the hook ---------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        if self.kind == OpKind.CONV_TRANSPOSE:
            return self.promote(*args, **kwargs)
        if self.kind == OpKind.EINSUM:
            equation, lhs, rhs = args[0], args[1], args[2]
            float_op: Any = functools.partial(jnp.einsum, equation, **kwargs)
            rest: tuple[Any, ...] = ()
        else:
            lhs, rhs, rest = args[0], args[1], args[2:]
            lax_op = jax.lax.dot_general if self.kind == OpKind.DOT_GENERAL else jax.lax.conv_general_dilated
            float_op = lambda x, w: lax_op(x, w, *rest, **kwargs)
        if self.mode == Mode.CALIBRATE:
            if self.stats is not None:
                self.stats.set_value(update_stats(self.stats.get_value(), lhs, self.rule.ema_decay))
            return float_op(lhs, rhs)
        acts = self._input_spec(args, lhs, rhs, rest)
        if self.mode == Mode.QAT:
            if self.kind != OpKind.CONV and self._integer_forward():
                return self._checked(lambda: self._qat_integer(args, lhs, rhs, rest, acts), "integer forward")
            x, w = self._fake_input(lhs, acts), self._fake_kernel(rhs)
            if self.rule.gradients is not None:
                return self._checked(
                    lambda: self._contract_quantized_backward(args, x, w, rest, kwargs), "backward"
                )
            return float_op(x, w)
        if self.mode != Mode.SERVE:
            raise ValueError(f"layer {self.path!r}: unknown mode {str(self.mode)!r}; use one of {MODES}")
        return self._serve(lhs, rhs, args, rest, kwargs, float_op, acts)

    def _input_spec(self, args: Any, lhs: jax.Array, rhs: Any, rest: tuple[Any, ...]) -> QuantSpec | None:
        """The rule's activation spec, with ``per_token`` meaning one scale per row of the
        contraction: where the input contracts over several trailing axes (a ``LinearGeneral``
        over heads and head dimension), the token's block spans all of them."""
        spec = self.rule.activations
        if spec is None or spec.granularity != Granularity.PER_TOKEN or self.kind == OpKind.CONV:
            return spec
        if self.kind == OpKind.EINSUM:
            rhs_ndim = rhs.data.ndim if isinstance(rhs, QArray) else rhs.ndim
            try:
                contracting = einsum_dimension_numbers(args[0], lhs.ndim, rhs_ndim)[0][0][0]
            except ValueError:
                return spec
        else:
            contracting = rest[0][0][0]
        axes = sorted(a % lhs.ndim for a in contracting)
        k = len(axes)
        if k > 1 and axes == list(range(lhs.ndim - k, lhs.ndim)):
            return dataclasses.replace(spec, granularity=Granularity.PER_BLOCK, block_shape=lhs.shape[-k:])
        return spec

    def promote(self, arrays: Any, /, *, dtype: Any = None, inexact: bool = True) -> Any:
        """``ConvTranspose``'s ``promote_dtype((x, kernel, bias))``: the layer then calls
        ``lax.conv_transpose`` on what this returns, so the operands are quantized here and the
        contraction runs in float on their values (served: the stored kernel dequantized)."""
        x, w, b = arrays
        spec = self.rule.activations
        if self.mode == Mode.CALIBRATE:
            if self.stats is not None:
                self.stats.set_value(update_stats(self.stats.get_value(), x, self.rule.ema_decay))
        elif self.mode == Mode.QAT:
            x, w = self._fake_input(x, spec), self._fake_kernel(w)
        elif self.mode == Mode.SERVE:
            if self.rule.weights is not None and not isinstance(w, QArray):
                raise ValueError(
                    f"layer {self.path!r} is in mode 'serve' but its kernel is float: convert the model "
                    "first with qjax.nn.convert(model)"
                )
            if isinstance(w, QArray):
                w = dequantize(w, jnp.result_type(x))
            if spec is not None:
                qparams = self.input_qparams()
                key = self._key()
                x = self._checked(lambda: quantize_dequantize(x, spec, key=key, qparams=qparams), "input")
        else:
            raise ValueError(f"layer {self.path!r}: unknown mode {str(self.mode)!r}; use one of {MODES}")
        return promote_dtype((x, w, b), dtype=dtype, inexact=inexact)

    # -- QAT --------------------------------------------------------------------------------------

    def _integer_forward(self) -> bool:
        rule = self.rule
        estimators = (rule.weight_estimator, rule.activation_estimator)
        return rule.integer_forward and supports_integer_forward(rule.weights, rule.activations, estimators)

    def _qat_integer(self, args, lhs, rhs, rest, acts):  # type: ignore[no-untyped-def]
        rule = self.rule
        assert rule.weights is not None and acts is not None
        if self.kind == OpKind.EINSUM:
            dn, perm = einsum_dimension_numbers(args[0], lhs.ndim, rhs.ndim)
        else:
            dn, perm = rest[0], None
        y = integer_forward_dot(
            lhs,
            rhs,
            dn,
            activations=acts,
            weights=rule.weights,
            activation_estimator=rule.activation_estimator,
            weight_estimator=rule.weight_estimator,
            activation_qparams=self._delayed("input", lhs, acts) or self._static_qparams(),
            weight_qparams=self._delayed("kernel", rhs, rule.weights) or self.weight_qparams(),
            keys=(self._key(), self._key()),
            residuals=rule.ste_residuals,
            gradients=rule.gradients,
            gradient_key=self._gradient_key(),
            gradient_history=self._gradient_history(),
        )
        return y if perm is None else jnp.transpose(y, perm)

    def _delayed(self, name: str, x: jax.Array, spec: QuantSpec | None) -> QParams | None:
        """Delayed scaling: the per-tensor parameters of the input or kernel from their amax
        history, which then takes this call's maximum (``None`` without a history)."""
        if self.amax_history is None or spec is None:
            return None
        histories = dict(self.amax_history.get_value())
        amax = amax_of(jax.lax.stop_gradient(x))
        qp = delayed_qparams(histories[name], amax, spec)
        histories[name] = pushed(histories[name], amax)
        self.amax_history.set_value(histories)
        return qp

    def _gradient_key(self) -> jax.Array | None:
        grads = self.rule.gradients
        return self._key() if grads is not None and needs_key(grads.rounding) else None

    def _gradient_history(self) -> jax.Array | None:
        return None if self.gradient_history is None else self.gradient_history[...]

    def _contract_quantized_backward(self, args, x, w, rest, kwargs):  # type: ignore[no-untyped-def]
        """The float contraction of the fake-quantized operands with the rule's quantized backward
        pass (:mod:`qjax.nn.quantized_backward`)."""
        spec = self.rule.gradients
        key, history = self._gradient_key(), self._gradient_history()
        if self.kind == OpKind.CONV:
            conv = lambda a, b: jax.lax.conv_general_dilated(a, b, *rest, **kwargs)
            return quantized_backward_conv(conv, spec, x, w, key, history)
        if self.kind == OpKind.EINSUM:
            dn, perm = einsum_dimension_numbers(args[0], x.ndim, w.ndim)
            return jnp.transpose(quantized_backward_dot(dn, spec, True, x, w, key, history), perm)
        return quantized_backward_dot(rest[0], spec, True, x, w, key, history)

    def _key(self) -> jax.Array | None:
        return None if self.rngs is None else self.rngs.quantize()

    def _estimator_key(self, estimator: str) -> jax.Array | None:
        """The key of an estimator's ``fake_quant``: ``None`` for one that draws noise once the
        model is in evaluation (``model.eval()``), so that it gives its evaluation value."""
        if getattr(self, "deterministic", False) and estimator_impl(estimator).needs_key:
            return None
        return self._key()

    def _fake_kernel(self, w: jax.Array) -> jax.Array:
        spec = self.rule.weights
        if spec is None:
            return w
        if self.centroids is not None and self.indices is not None:
            centroids, indices = self.centroids[...], self.indices[...]
            return self._checked(lambda: codebook_weight(centroids, indices, spec).astype(w.dtype), "kernel")
        scale = None if self.weight_scale is None else self.weight_scale[...]
        qparams = self._delayed("kernel", w, spec) or self.weight_qparams()
        return self._checked(
            lambda: fake_quant(
                w,
                spec,
                self.rule.weight_estimator,
                key=self._estimator_key(self.rule.weight_estimator),
                scale=scale,
                qparams=qparams,
            ),
            "kernel",
        )

    def weight_qparams(self) -> QParams | None:
        """Fixed kernel parameters (set by e.g. AdaRound), or ``None``: calibrated from the kernel."""
        value = None if self.weight_static is None else self.weight_static.get_value()
        return None if value is None else QParams(*value)

    def _fake_input(self, x: jax.Array, spec: QuantSpec | None) -> jax.Array:
        if spec is None:
            return x
        est = self.rule.activation_estimator

        def run() -> jax.Array:
            if est in (Estimator.LSQ, Estimator.LSQ_PLUS):
                assert self.act_scale is not None
                n = math.prod(x.shape[1:]) if x.ndim > 1 else x.size  # features per example (LSQ)
                _, qmax = _int_format(spec, self.path).qrange(spec.symmetric)
                # LSQ+: the offset rounded onto the zero-point grid, so serving computes the same
                learned: dict[str, Any] = {}
                if self.act_offset is not None:
                    learned = dict(offset=self.act_offset[...], integer_offset=True)
                return fake_quant(
                    x,
                    spec,
                    est,
                    key=self._key(),
                    scale=self.act_scale[...],
                    grad_scale=1.0 / math.sqrt(n * qmax),
                    **learned,
                )
            if est == Estimator.PACT:
                assert self.act_clip is not None
                return fake_quant(x, spec, est, key=self._key(), clip=self.act_clip[...])
            qparams = self._delayed("input", x, spec) or self._static_qparams()
            return fake_quant(x, spec, est, key=self._estimator_key(est), qparams=qparams)

        return self._checked(run, "input")

    def _static_qparams(self) -> QParams | None:
        if self.rule.activation_scale != ActivationScale.STATIC:
            return None
        if self.static is None or self.static.get_value() is None:
            raise ValueError(
                f"layer {self.path!r} uses static activation scales but has no calibration: run "
                "qjax.nn.calibrate(model, batches) (or mode 'calibrate' on a few batches) first"
            )
        return QParams(*self.static.get_value())

    def _checked(self, fn: Any, what: str) -> jax.Array:
        try:
            return fn()
        except (ValueError, TypeError) as e:
            if str(e).startswith("layer "):
                raise
            raise type(e)(f"layer {self.path!r} ({what}): {e}") from None

    # -- serve ------------------------------------------------------------------------------------

    def input_qparams(self) -> QParams | None:
        """Fixed activation parameters for serving: static calibration, LSQ, LSQ+ or PACT; else None.

        LSQ+: :math:`S = s`, :math:`Z = \\lfloor -\\beta/s \\rceil`, the integer offset the qat forward
        already uses (:func:`qjax.ste.lsq_plus_qparams`)."""
        if self.act_offset is not None and self.act_scale is not None:
            return lsq_plus_qparams(self.act_scale[...], self.act_offset[...])
        if self.act_scale is not None:
            return QParams(self.act_scale[...])
        if self.act_clip is not None:
            spec = self.rule.activations
            assert spec is not None
            return QParams(_int_format(spec, self.path).symmetric_scale(self.act_clip[...]))
        return self._static_qparams()

    def _serve(self, lhs, rhs, args, rest, kwargs, float_op, spec):  # type: ignore[no-untyped-def]
        if self.rule.weights is not None and not isinstance(rhs, QArray):
            raise ValueError(
                f"layer {self.path!r} is in mode 'serve' but its kernel is float: convert the model "
                "first with qjax.nn.convert(model)"
            )
        x: jax.Array | QArray = lhs
        if spec is not None:
            x = self._checked(
                lambda: quantize(lhs, spec, key=self._key(), qparams=self.input_qparams()), "input"
            )
        if not isinstance(rhs, QArray):  # activation-only rule: the simulated input meets a float kernel
            return float_op(dequantize(x, lhs.dtype) if isinstance(x, QArray) else x, rhs)
        out_dtype = jnp.result_type(lhs)
        if self.kind == OpKind.DOT_GENERAL:
            prepared = None if self.prepared is None else self.prepared.get_value()
            return kernels.serve_dot_general(
                x, rhs, rest[0], out_dtype=out_dtype, path=self.rule.kernels, prepared=prepared
            )
        if self.kind == OpKind.CONV:
            conv_kwargs = _conv_kwargs(rest, kwargs)
            return self._checked(
                lambda: kernels.quantized_conv(x, rhs, out_dtype=out_dtype, **conv_kwargs), "convolution"
            )
        dn, perm = einsum_dimension_numbers(args[0], lhs.ndim, rhs.data.ndim)
        y = kernels.serve_dot_general(x, rhs, dn, out_dtype=out_dtype, path=self.rule.kernels)
        return jnp.transpose(y, perm)


class QuantizedOp(QuantizedContraction, nnx.Module):
    """A :class:`QuantizedContraction` as an ``nnx.Module``: the form that holds quantizer state
    (its variables are nodes of the model's graph, trained, calibrated and checkpointed with it)."""

    def __init__(
        self,
        kind: OpKind | str,
        path: str,
        rule: Rule,
        kernel: jax.Array | None,
        mode: Mode | str,
        seed: int = 0,
    ):
        self.kind = parse_enum(OpKind, kind, "kind")
        self.path = path
        self.rule = rule
        self.mode = parse_enum(Mode, mode, "mode")
        w, a = rule.weights, rule.activations
        lsq = rule.weight_estimator == Estimator.LSQ
        if (
            kernel is None
            and w is not None
            and rule.weight_estimator in (Estimator.LSQ, Estimator.KMEANS_FINETUNE)
        ):
            raise ValueError(
                f"layer {path!r}: a {rule.weight_estimator} weight quantizer is built from the kernel"
            )
        if lsq and w is not None and kernel is not None:
            self.weight_scale = nnx.Param(lsq_init_scale(kernel, w))
        centroids, indices = _codebook_state(rule, kernel, path)
        if centroids is not None:
            self.centroids, self.indices = centroids, indices
        lsq_plus = _learns(rule, Estimator.LSQ_PLUS)
        if needs_statistics(rule):
            self.stats = QuantStats(init_stats(rule.histogram_bins))
        if _learns(rule, Estimator.LSQ) or lsq_plus:
            self.act_scale = nnx.Param(jnp.ones((), jnp.float32))
        if lsq_plus:
            self.act_offset = nnx.Param(jnp.zeros((), jnp.float32))
        if _learns(rule, Estimator.PACT):
            self.act_clip = nnx.Param(jnp.full((), 6.0, jnp.float32))
        if rule.activation_scale == ActivationScale.STATIC:
            self.static = StaticQParams(None)  # set by calibration
        stochastic = any(s is not None and needs_key(s.rounding) for s in (w, a))
        grads = rule.gradients
        if grads is not None:
            stochastic = stochastic or needs_key(grads.rounding)
            if self.kind == OpKind.CONV_TRANSPOSE:
                raise ValueError(
                    f"layer {path!r}: a ConvTranspose layer keeps a float backward pass; exclude it "
                    "from the rule with gradients (a rule of its own without them)"
                )
        h = rule.amax_history
        if h:  # delayed scaling
            names = [name for name, s in (("input", a), ("kernel", w)) if s is not None]
            self.amax_history = AmaxHistory({name: jnp.zeros((h,), jnp.float32) for name in names})
            if grads is not None:
                self.gradient_history = GradientAmaxHistory(jnp.zeros((h,), jnp.float32))
        # an estimator that draws noise (a plug-in registered with needs_key) gets a key stream in
        # training and key=None after model.eval(), which sets deterministic (as for nnx.Dropout)
        estimators = ((w, rule.weight_estimator), (a, rule.activation_estimator))
        keyed = any(s is not None and estimator_impl(e).needs_key for s, e in estimators)
        if keyed:
            self.deterministic = False
        if stochastic or keyed:
            self.rngs = nnx.Rngs(quantize=seed)

    def holds_state(self) -> bool:
        """Whether the op holds any variable, key stream or training flag (else
        :meth:`frozen` gives its immutable form)."""
        return "deterministic" in vars(self) or any(
            isinstance(v, nnx.Variable | nnx.Pytree) for v in vars(self).values()
        )

    def frozen(self) -> FrozenQuantizedOp:
        """The same contraction as a :class:`FrozenQuantizedOp` (the op must hold no state)."""
        if self.holds_state():
            raise ValueError(f"layer {self.path!r}: its op holds quantizer state, which a frozen op cannot")
        return FrozenQuantizedOp(self.kind, self.path, self.rule, self.mode)


@dataclasses.dataclass(frozen=True)
class FrozenQuantizedOp(QuantizedContraction):
    """A :class:`QuantizedContraction` that holds no state (dynamic scales, a stateless estimator),
    as an immutable value: installed as a static attribute of its layer (:func:`install_op`), it is
    no node of the module graph, so ``nnx.jit`` and ``nnx.split`` do not walk it on every call, as
    they walk each module. Its fields are compared and hashed like any static value, so a new mode
    or rule is a new value (:func:`update_op`), and a compiled function retraces for it."""

    kind: OpKind
    path: str
    rule: Rule
    mode: Mode

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", parse_enum(OpKind, self.kind, "kind"))
        object.__setattr__(self, "mode", parse_enum(Mode, self.mode, "mode"))


def install_op(layer: nnx.Module, op: QuantizedContraction) -> QuantizedContraction:
    """Set ``op`` as the hook of ``layer`` (:func:`~qjax.nn.hooks.layer_hook`) and return what was
    set: a :class:`QuantizedOp` that holds state as a data attribute (a graph node), one that holds
    none as its :class:`FrozenQuantizedOp`, a static attribute."""
    if isinstance(op, QuantizedOp) and not op.holds_state():
        op = op.frozen()
    value = nnx.static(op) if isinstance(op, FrozenQuantizedOp) else nnx.data(op)
    setattr(layer, layer_hook(layer).hook, value)
    return op


Op = TypeVar("Op", bound=QuantizedContraction | nnx.Module)


def update_op(layer: nnx.Module, op: Op, **changes: Any) -> Op:
    """The op of ``layer`` with ``changes`` to its fields (``mode``, ``rule``): set in place on a
    module (a :class:`QuantizedOp`, a :class:`QuantizedEmbedding`, an attention layer's op); a
    :class:`FrozenQuantizedOp` is replaced by a new one, installed in ``layer``. Returns the
    layer's op."""
    if isinstance(op, nnx.Module):
        for name, value in changes.items():
            setattr(op, name, value)
        return op
    assert isinstance(op, FrozenQuantizedOp)
    return cast(Op, install_op(layer, dataclasses.replace(op, **changes)))


def stateful_op(layer: nnx.Module, op: QuantizedContraction) -> QuantizedOp:
    """The op of ``layer`` as a :class:`QuantizedOp`, ready to take state (a pinned weight grid, a
    kernel layout): a :class:`FrozenQuantizedOp` is replaced by the equal ``QuantizedOp``."""
    if isinstance(op, QuantizedOp):
        return op
    module = QuantizedOp(op.kind, op.path, op.rule, None, op.mode)
    setattr(layer, layer_hook(layer).hook, nnx.data(module))
    return module


def drop_state(op: QuantizedContraction | QuantizedEmbedding, *names: str) -> None:
    """Remove the optional state variables ``names`` of a :class:`QuantizedOp` or
    :class:`QuantizedEmbedding` (those it holds): each then reads as ``None`` again and leaves the
    module graph, where a variable set to ``None`` would stay a node."""
    for name in names:
        if name in vars(op):
            delattr(op, name)


def _learns(rule: Rule, est: Estimator) -> bool:
    return rule.activations is not None and rule.activation_estimator == est


def _int_format(spec: QuantSpec, path: str) -> IntFormat:
    fmt = spec.format
    if not isinstance(fmt, IntFormat):
        raise ValueError(
            f"layer {path!r}: learned activation quantizers need an integer dtype; got {spec.dtype}"
        )
    return fmt


_CONV_ARGS = ("window_strides", "padding")


def _conv_kwargs(rest: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(zip(_CONV_ARGS, rest, strict=False))
    out.update(
        {k: v for k, v in kwargs.items() if k not in ("precision", "out_sharding", "preferred_element_type")}
    )
    return out


def einsum_dimension_numbers(equation: str, lhs_ndim: int, rhs_ndim: int):  # type: ignore[no-untyped-def]
    """``dot_general`` dimension numbers of a two-operand einsum, and the output permutation.

    Labels in both operands and the output are batch axes; in both but not the output, contracted.
    """
    equation = equation.replace(" ", "")
    inputs, _, out = equation.partition("->")
    try:
        lhs, rhs = inputs.split(",")
    except ValueError:
        raise ValueError(f"einsum {equation!r} must have exactly two operands") from None
    if "." in equation or len(lhs) != lhs_ndim or len(rhs) != rhs_ndim or len(set(lhs)) != len(lhs):
        raise ValueError(f"einsum {equation!r}: the serve path needs explicit labels, each once per operand")
    batch = [c for c in lhs if c in rhs and c in out]
    contract = [c for c in lhs if c in rhs and c not in out]
    dn = (
        (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
        (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
    )
    produced = batch + [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
    if sorted(produced) != sorted(out):
        raise ValueError(f"einsum {equation!r}: labels that appear in one operand only must be in the output")
    return dn, tuple(produced.index(c) for c in out)


def promote_keeping_quantized(args: Any, /, *, dtype: Any = None, inexact: bool = True) -> Any:
    """Flax's ``promote_dtype`` for the float operands; stored ``QArray`` kernels pass through."""
    floats = [a for a in args if not isinstance(a, QArray)]
    promoted = iter(promote_dtype(tuple(floats), dtype=dtype, inexact=inexact))
    return tuple(a if isinstance(a, QArray) else next(promoted) for a in args)


def promote_keeping_quantized_varargs(*args: Any, dtype: Any = None, inexact: bool = True) -> Any:
    """:func:`promote_keeping_quantized` in Linen's form (``promote_dtype(*arrays, dtype=...)``)."""
    return promote_keeping_quantized(args, dtype=dtype, inexact=inexact)


class QuantizedEmbedding(nnx.Module):
    """``nnx.Embed``'s ``promote_dtype`` hook: fake-quantizes (qat) or dequantizes (serve) the table.

    The table is the last operand in both ``Embed.__call__`` and ``Embed.attend``. As in
    :class:`QuantizedOp`, the quantizer state is held only where the rule uses it.
    """

    weight_scale: nnx.Param | None = None
    centroids: nnx.Param | None = None
    indices: CodebookIndices | None = None

    def __init__(self, path: str, rule: Rule, table: jax.Array, mode: Mode | str):
        self.path = path
        self.rule = rule
        self.mode = parse_enum(Mode, mode, "mode")
        spec = rule.weights
        if rule.weight_estimator == Estimator.LSQ and spec is not None:
            self.weight_scale = nnx.Param(lsq_init_scale(table, spec))
        centroids, indices = _codebook_state(rule, table, path)
        if centroids is not None:
            self.centroids, self.indices = centroids, indices

    def __call__(self, args: Any, /, *, dtype: Any = None, inexact: bool = True) -> Any:
        *rest, table = args
        spec = self.rule.weights
        if isinstance(table, QArray):
            table = dequantize(table, jnp.float32)
        elif self.mode == Mode.SERVE and spec is not None:
            raise ValueError(
                f"layer {self.path!r} is in mode 'serve' but its table is float: convert the model "
                "first with qjax.nn.convert(model)"
            )
        elif self.mode == Mode.QAT and spec is not None and self.centroids is not None:
            assert self.indices is not None
            table = codebook_weight(self.centroids[...], self.indices[...], spec).astype(table.dtype)
        elif self.mode == Mode.QAT and spec is not None:
            scale = None if self.weight_scale is None else self.weight_scale[...]
            table = fake_quant(table, spec, self.rule.weight_estimator, scale=scale)
        return promote_dtype((*rest, table), dtype=dtype, inexact=inexact)


def quantize_kernel(op: QuantizedContraction | QuantizedEmbedding, kernel: jax.Array) -> QArray:
    """The stored kernel of a converted layer (with its learned LSQ scale or fine-tuned codebook)."""
    return quantize_kernels([(op, kernel)])[0]


def quantize_kernels(
    layers: Sequence[tuple[QuantizedContraction | QuantizedEmbedding, jax.Array]],
) -> list[QArray]:
    """:func:`quantize_kernel` of every ``(op, kernel)`` pair, the quantizers of all the layers
    compiled as one program (one compilation per model, not one per layer shape)."""
    out: list[QArray | None] = [None] * len(layers)
    todo, specs = [], []
    for i, (op, kernel) in enumerate(layers):
        spec = op.rule.weights
        assert spec is not None
        if op.centroids is not None and op.indices is not None:
            out[i] = codebook_qarray(op.centroids[...], op.indices[...], spec)
            continue
        if op.weight_scale is not None:
            qparams: QParams | None = QParams(op.weight_scale[...])
        else:
            qparams = op.weight_qparams() if isinstance(op, QuantizedContraction) else None
        if qparams is None:
            check_finite(kernel, "kernel")  # a no-op inside the compiled quantizer: check before
        todo.append((i, kernel, qparams))
        specs.append(spec)
    if todo:
        kernels = [kernel for _, kernel, _ in todo]
        qparams_list = [qp for _, _, qp in todo]
        for (i, _, _), q in zip(todo, _jit_quantize_all(kernels, tuple(specs), qparams_list), strict=True):
            out[i] = q
    return [q for q in out if q is not None]


@functools.partial(jax.jit, static_argnums=1)
def _jit_quantize_all(
    kernels: list[jax.Array], specs: tuple[QuantSpec, ...], qparams: list[QParams | None]
) -> list[QArray]:
    key = jax.random.key(0)  # stochastic-rounding weight specs: a fixed draw, as at every convert
    return [quantize(k, s, qparams=qp, key=key) for k, s, qp in zip(kernels, specs, qparams, strict=True)]
