"""Quantize a Flax NNX model by rules, switch its mode, calibrate it, convert it for serving.

.. code-block:: python

    rules = [qjax.nn.Rule(path=r".*attn.*", weights=spec_w4, activations=spec_a8),
             qjax.nn.Rule(path=r".*", weights=spec_w8)]          # first match wins
    qmodel = qjax.nn.quantize_model(model, rules, mode="qat")   # model itself is left unchanged

The model's own layer objects are kept: each matched ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Conv`` or ``nnx.Einsum`` gets a :class:`~qjax.nn.ops.QuantizedContraction` as its contraction
hook (a :class:`~qjax.nn.ops.QuantizedOp` module where it holds quantizer state, else a
:class:`~qjax.nn.ops.FrozenQuantizedOp` static value), each
``nnx.ConvTranspose`` one as its ``promote_dtype`` hook, each ``nnx.Embed`` a
:class:`~qjax.nn.ops.QuantizedEmbedding` as its ``promote_dtype`` hook, and each attention layer
(``nnx.MultiHeadAttention``, or any module with an ``attention_fn``: the attention protocol of
:mod:`qjax.nn.attention`) matched by a rule of ``kind='attention'`` a
:class:`~qjax.nn.attention.QuantizedAttention` as its ``attention_fn``. Converting replaces a kernel
``nnx.Param`` by a :class:`QuantizedWeight` variable holding a packed ``QArray``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from qjax.kernels.dispatch import Prepared, check_kernel_path, prepare_w4a16
from qjax.nn.attention import QuantizedAttention, check_attention_layer
from qjax.nn.hooks import (
    ATTENTION_HOOK,
    HOOKS,
    OpKind,
    attention_layers,
    is_attention_layer,
    layer_hook,
    quantizable_layers,
)
from qjax.nn.ops import (
    MODES,
    KernelLayout,
    Mode,
    QuantizedContraction,
    QuantizedEmbedding,
    QuantizedOp,
    drop_state,
    install_op,
    promote_keeping_quantized,
    quantize_kernels,
    stateful_op,
    update_op,
)
from qjax.nn.rules import ActivationScale, Rule, RuleKind, first_match
from qjax.nn.stats import StaticQParams, lsq_scale_from_stats, static_qparams, static_range
from qjax.numerics import QArray, QParams, tiling
from qjax.numerics.formats import MIN_SCALE, CodebookFormat, IntFormat
from qjax.numerics.rounding import Rounding
from qjax.numerics.spec import Granularity
from qjax.ste import Estimator

logger = logging.getLogger("qjax")

M = TypeVar("M", bound=nnx.Module)


class QuantizedWeight(nnx.Variable):
    """A converted layer's stored weight: a ``QArray`` (packed values, scales, zero points)."""


class UnusedRuleWarning(UserWarning):
    """A rule matched no layer (often a typo in its path)."""


def quantized_ops(
    model: nnx.Module,
) -> list[tuple[str, nnx.Module, QuantizedContraction | QuantizedEmbedding]]:
    """``(path, layer, op)`` of every quantized layer."""
    out = []
    for path, layer in quantizable_layers(model):
        op = getattr(layer, layer_hook(layer).hook)
        if isinstance(op, QuantizedContraction | QuantizedEmbedding):
            out.append((path, layer, op))
    return out


def attention_ops(model: nnx.Module) -> list[tuple[str, nnx.Module, QuantizedAttention]]:
    """``(path, layer, op)`` of every attention layer whose contractions are quantized."""
    found = [(path, layer, getattr(layer, ATTENTION_HOOK.hook)) for path, layer in attention_layers(model)]
    return [(path, layer, fn) for path, layer, fn in found if isinstance(fn, QuantizedAttention)]


def _as_rules(rules: Iterable[Rule | Mapping[str, Any]]) -> list[Rule]:
    if isinstance(rules, Rule | Mapping):
        raise TypeError("rules must be a list of qjax.nn.Rule (or mappings); wrap a single rule in a list")
    return [r if isinstance(r, Rule) else Rule.from_dict(r) for r in rules]


def _check_kernel(path: str, rule: Rule, kernel: jax.Array) -> None:
    if rule.weights is None:
        return
    try:
        tiling.block_shape(kernel.shape, rule.weights)
    except ValueError as e:
        raise ValueError(f"layer {path!r} (kernel {tuple(kernel.shape)}), rule {rule.path!r}: {e}") from None


def quantize_model(
    model: M,
    rules: Iterable[Rule | Mapping[str, Any]],
    mode: Mode | str = Mode.QAT,
    *,
    seed: int = 0,
) -> M:
    """A quantized copy of ``model`` (``model`` is left unchanged).

    Args:
      model: any NNX module; its Linear, Conv, Einsum and Embed layers are candidates, and its
        attention layers for rules of ``kind='attention'``.
      rules: :class:`Rule` list; the first rule whose ``path`` matches a layer applies.
      mode: ``qat`` (fake quantization, trainable), ``calibrate`` (collect activation statistics)
        or ``convert`` (stored integer weights, ready to serve; static activation scales need a
        calibrated model: use :func:`convert` on it).
      seed: seed of the stochastic-rounding streams.

    Warns :class:`UnusedRuleWarning` for rules that matched nothing; logs a WARNING listing every
    parameter-holding module left in float, with its type and why (:func:`float_modules`).
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"quantize_model needs a flax NNX module (nnx.Module); got {type(model).__name__}. A Linen "
            "model takes qjax.nn.FakeQuantDotGeneral as its layers' dot_general instead"
        )
    if mode not in (Mode.QAT, Mode.CALIBRATE, Mode.CONVERT):
        hint = " ('serve' runs a converted model: use mode='convert')" if mode == Mode.SERVE else ""
        raise ValueError(f"mode={mode!r} is not one of 'qat', 'calibrate', 'convert'{hint}")
    mode = Mode(mode)
    layer_mode = Mode.QAT if mode == Mode.CONVERT else mode
    rules = _as_rules(rules)
    for path, _, _ in quantized_ops(model):
        raise ValueError(
            f"layer {path!r} is already quantized; quantize the float model (quantize_model leaves "
            "its input unchanged, so keep a reference to it)"
        )
    qmodel = nnx.clone(model)
    used: set[int] = set()
    why: dict[str, str] = {}  # path of a contraction left in float -> the reason
    for path, layer in quantizable_layers(qmodel):
        match = first_match(rules, path)
        if match is None or match[1].is_exclusion:
            why[path] = "no rule matched" if match is None else f"rule {match[0]} excludes it"
            if match is not None:
                used.add(match[0])
            continue
        index, rule = match
        used.add(index)
        hook = layer_hook(layer)
        if getattr(layer, "dot_general_cls", None) is not None:
            raise ValueError(
                f"layer {path!r} sets dot_general_cls, which Flax calls instead of the dot_general hook "
                "qjax installs; build the layer without dot_general_cls, or exclude it from the rules"
            )
        kernel = getattr(layer, hook.kernel)[...]
        _check_kernel(path, rule, kernel)
        if hook.kind == OpKind.EMBED:
            if rule.activations is not None:  # an Embed's input is integer ids: weights only
                logger.info("layer %s is an Embed: activations of rule %r not applied", path, rule.path)
                rule = dataclasses.replace(rule, activations=None, activation_scale=ActivationScale.DYNAMIC)
            setattr(layer, hook.hook, nnx.data(QuantizedEmbedding(path, rule, kernel, layer_mode)))
        else:
            install_op(layer, QuantizedOp(hook.kind, path, rule, kernel, layer_mode, seed=seed))
    for path, layer in attention_layers(qmodel):
        match = first_match(rules, path, RuleKind.ATTENTION)
        if match is not None:
            used.add(match[0])
        if match is None or match[1].is_exclusion:
            why[f"{path} (QK^T, PV)"] = (
                "no rule of kind='attention' matched" if match is None else f"rule {match[0]} excludes it"
            )
            continue
        check_attention_layer(path, layer)
        setattr(
            layer, ATTENTION_HOOK.hook, nnx.data(QuantizedAttention(path, match[1], layer_mode, seed=seed))
        )
    for i, rule in enumerate(rules):
        if i not in used:
            warnings.warn(
                f"rule {i} (path={rule.path!r}, kind={str(rule.kind)!r}) matched no layer",
                UnusedRuleWarning,
                stacklevel=2,
            )
    left = float_modules(qmodel, why)
    if left:
        logger.warning(
            "%d parameter-holding modules left in float:\n%s",
            len(left),
            "\n".join(f"  {path} ({kind}): {reason}" for path, kind, reason in left),
        )
    return convert(qmodel) if mode == Mode.CONVERT else qmodel


_NO_CONTRACTION = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm)
_QJAX_MODULES = (QuantizedOp, QuantizedEmbedding, QuantizedAttention)


def float_modules(model: nnx.Module, why: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
    """``(path, type, reason)`` of every module of ``model`` that holds parameters and computes in
    float: contraction layers no rule quantized (``why`` gives the reason by path, as
    :func:`quantize_model` found it), attention layers whose :math:`QK^T`, :math:`PV` stay float,
    normalization layers, and modules with their own parameters that qjax cannot hook."""
    why = dict(why or {})
    out = []
    for parts, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or isinstance(node, _QJAX_MODULES):
            continue
        path = "/".join(str(p) for p in parts) or "(root)"
        kind = type(node).__name__
        if isinstance(node, tuple(HOOKS)):
            op = getattr(node, layer_hook(node).hook)
            if not isinstance(op, QuantizedContraction | QuantizedEmbedding):
                out.append((path, kind, why.get(path, "not quantized")))
            continue
        if is_attention_layer(node) and not isinstance(
            getattr(node, ATTENTION_HOOK.hook), QuantizedAttention
        ):
            label = f"{path} (QK^T, PV)"
            out.append((label, kind, why.get(label, "attention contractions not quantized")))
        own = [name for name, v in vars(node).items() if isinstance(v, nnx.Param)]
        if not own:
            continue
        if isinstance(node, _NO_CONTRACTION):
            reason = "normalization: elementwise scale and shift, no contraction"
        else:
            reason = (
                f"holds its own parameters ({', '.join(own)}) outside the layers qjax hooks (Linear, "
                "LinearGeneral, Conv, ConvTranspose, Einsum, Embed, attention_fn): a matmul "
                "that uses them stays float; build it from those layers to quantize it"
            )
        out.append((path, kind, reason))
    return out


def pin_weight_qparams(layer: nnx.Module, w_hat: jax.Array, qp: QParams) -> None:
    """Store ``w_hat`` as the kernel of the quantized ``layer`` and pin its weight quantizer to the
    grid ``qp`` (rounding to nearest): a method that chose both (AdaRound, GPTQ, AWQ) installs its
    result so that ``qat``, ``serve`` and :func:`convert` all use exactly those codes."""
    op = getattr(layer, layer_hook(layer).hook, None)
    if not isinstance(op, QuantizedContraction) or op.rule.weights is None:
        raise ValueError(
            f"{type(layer).__name__} has no weight quantizer to pin: quantize the model with a rule "
            "that sets weights (qjax.nn.quantize_model) first"
        )
    layer.kernel.set_value(w_hat)  # type: ignore[attr-defined]
    nearest = dataclasses.replace(op.rule.weights, rounding=Rounding.NEAREST)
    if op.weight_scale is not None:  # an LSQ rule: its step size is the grid's scale already
        op.weight_scale.set_value(qp.scale.astype(op.weight_scale[...].dtype))
    elif op.weight_static is not None:
        op.weight_static.set_value(tuple(qp))
    else:
        op = stateful_op(layer, op)
        op.weight_static = StaticQParams(tuple(qp))
    op.rule = dataclasses.replace(op.rule, weights=nearest)


def set_kernels(model: M, kernels: str) -> M:
    """Set the ``kernels`` field of every quantized layer's rule (in place; returns ``model``):
    ``auto``, ``pallas``, ``xla``, ``reference`` or ``mosaic_gpu`` (see :class:`Rule`). The rule is
    static, so a jitted forward retraces for the new path."""
    check_kernel_path(kernels)
    for _, layer, op in quantized_ops(model):
        update_op(layer, op, rule=dataclasses.replace(op.rule, kernels=kernels))
    return model


def set_mode(model: M, mode: Mode | str) -> M:
    """Switch every quantized layer to ``qat`` or ``calibrate`` (in place; returns ``model``).

    Leaving ``calibrate`` for ``qat`` fixes static activation scales from the statistics and
    initialises learned LSQ scales (:math:`2\\mathbb{E}|x|/\\sqrt{q_{max}}`), PACT clips (the
    calibrated max) and LSQ+ step sizes and offsets (:math:`s = (hi - lo)/(q_{max} - q_{min})`,
    :math:`\\beta = lo - q_{min} s` with ``[lo, hi]`` the rule observer's range: min/max by default).
    """
    if mode not in (Mode.QAT, Mode.CALIBRATE):
        hint = "; serving needs qjax.nn.convert(model)" if mode == Mode.SERVE else ""
        raise ValueError(f"mode={mode!r} cannot be set in place: use 'qat' or 'calibrate'{hint}")
    mode = Mode(mode)
    ops: list[tuple[str, nnx.Module, Any]] = [*quantized_ops(model), *attention_ops(model)]
    for path, layer, op in ops:
        if op.mode == Mode.SERVE:
            raise ValueError(f"layer {path!r} is converted (mode 'serve'); quantize the float model again")
        if isinstance(op, QuantizedContraction) and op.mode == Mode.CALIBRATE and mode == Mode.QAT:
            _finish_calibration(op)
        update_op(layer, op, mode=mode)
    return model


def _finish_calibration(op: QuantizedContraction) -> None:
    if op.stats is None or int(op.stats.get_value()["count"]) == 0:
        return
    rule, stats = op.rule, op.stats.get_value()
    spec = rule.activations
    assert spec is not None
    if op.static is not None:  # static activation scales
        op.static.set_value(tuple(static_qparams(stats, rule.observer, spec)))
    fmt = spec.format
    if op.act_offset is not None and op.act_scale is not None and isinstance(fmt, IntFormat):
        scale, offset = lsq_plus_from_range(*static_range(stats, rule.observer, spec), fmt)
        op.act_scale.set_value(scale)
        op.act_offset.set_value(offset)
    elif op.act_scale is not None and hasattr(fmt, "qrange"):
        op.act_scale.set_value(lsq_scale_from_stats(stats, fmt.qrange(spec.symmetric)[1]))
    if op.act_clip is not None:
        op.act_clip.set_value(stats["max"].reshape(()))


def lsq_plus_from_range(lo: jax.Array, hi: jax.Array, fmt: IntFormat) -> tuple[jax.Array, jax.Array]:
    """LSQ+'s min/max initialisation from a calibrated range: :math:`s = (hi - lo)/(q_{max} - q_{min})`,
    :math:`\\beta = lo - q_{min} s` (the asymmetric full range; not widened to include 0)."""
    qmin, qmax = fmt.qrange(False)
    lo, hi = jnp.asarray(lo, jnp.float32).reshape(()), jnp.asarray(hi, jnp.float32).reshape(())
    scale = jnp.maximum((hi * 0.5 - lo * 0.5) * float(np.float32(2.0 / (qmax - qmin))), MIN_SCALE)
    return scale, lo - qmin * scale


_DEFAULT_FORWARD = nnx.jit(lambda m, b: m(b))
# One jitted forward per user function, so repeated calibrations reuse the compiled program.
_jitted_forwards: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def calibrate(
    model: M,
    batches: Iterable[Any],
    forward: Callable[[M, Any], Any] | None = None,
) -> M:
    """Run ``batches`` through ``model`` in calibrate mode, then return it in qat mode.

    ``forward(model, batch)`` defaults to ``model(batch)``; it runs under ``nnx.jit``.
    """
    fwd = _DEFAULT_FORWARD if forward is None else _jitted_forwards.setdefault(forward, nnx.jit(forward))
    training = _in_training_mode(model)
    if training:
        warnings.warn(
            f"calibrate: {training} in training mode (dropout on, batch statistics updated by the "
            "calibration batches); call model.eval() first",
            stacklevel=2,
        )
    set_mode(model, Mode.CALIBRATE)
    n = 0
    for batch in batches:
        _check_finite_batch(batch, n)
        fwd(model, batch)
        n += 1
    if n == 0:
        raise ValueError("calibrate got no batches; pass an iterable of at least one input batch")
    _check_finite_stats(model)
    return set_mode(model, Mode.QAT)


def _in_training_mode(model: nnx.Module) -> str:
    """The layers of ``model`` that behave as in training (a Dropout that drops, a BatchNorm that
    uses and updates batch statistics), named for a warning; empty if none."""
    found = [
        "/".join(map(str, path)) or type(m).__name__
        for path, m in nnx.iter_graph(model)
        if (isinstance(m, nnx.Dropout) and m.deterministic is False and m.rate > 0)
        or (isinstance(m, nnx.BatchNorm) and m.use_running_average is False)
    ]
    return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def _check_finite_batch(batch: Any, index: int) -> None:
    """A calibration batch with NaN or Inf would make static scales non-finite: refuse it."""
    for x in jax.tree.leaves(batch):
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
            bad = int(jnp.size(x) - jnp.count_nonzero(jnp.isfinite(x)))
            if bad:
                raise ValueError(
                    f"calibration batch {index} holds {bad} non-finite values (NaN or Inf); calibrate on "
                    "finite inputs (clean or filter the data)"
                )


def _check_finite_stats(model: nnx.Module) -> None:
    """Statistics that overflowed inside the model (finite inputs, non-finite activations)."""
    for path, _, op in quantized_ops(model):
        stats = getattr(op, "stats", None)
        if stats is None:
            continue
        values = stats.get_value()
        low, high = float(values["min"]), float(values["max"])
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(
                f"layer {path!r}: its calibration statistics are not finite (min={low}, max={high}): "
                "its inputs overflow on the calibration batches; check the model's earlier layers"
            )


def convert(model: M) -> M:
    """A serving copy of a quantized model: kernels stored as ``QArray`` (int4 packed), activation
    parameters fixed where the rule asks for static (or learned) scales. ``model`` is unchanged."""
    served = nnx.clone(model)
    ops = quantized_ops(served)
    attention = attention_ops(served)
    if not ops and not attention:
        raise ValueError("the model has no quantized layers; call qjax.nn.quantize_model first")
    for path, _, att in attention:
        if att.mode == Mode.SERVE:
            raise ValueError(f"layer {path!r} is already converted")
        att.mode = Mode.SERVE
    stored: list[tuple[nnx.Module, str, QuantizedContraction | QuantizedEmbedding, jax.Array]] = []
    for path, layer, op in ops:
        if op.mode == Mode.SERVE:
            raise ValueError(f"layer {path!r} is already converted")
        if isinstance(op, QuantizedContraction):
            if op.mode == Mode.CALIBRATE:
                _finish_calibration(op)
            op = update_op(layer, op, mode=Mode.QAT)
            op.input_qparams()  # fails here, naming the layer, if static scales were never calibrated
        hook_name, kernel_name, kind = layer_hook(layer)
        if op.rule.weights is not None:
            if kind in (OpKind.CONV, OpKind.CONV_TRANSPOSE) and getattr(layer, "mask", None) is not None:
                raise ValueError(f"layer {path!r}: fold the Conv mask into the kernel before converting")
            kernel = getattr(layer, kernel_name)[...]
            if op.rule.activations is not None and isinstance(op.rule.weights.format, CodebookFormat):
                raise ValueError(
                    f"layer {path!r}: {op.rule.weights.dtype} weights are served weight-only (the "
                    "codebook decodes to float, no integer contraction); drop the rule's activation spec "
                    "for serving, or use an integer weight dtype"
                )
            if kind == OpKind.CONV and op.rule.activations is not None:
                _check_integer_conv(path, op.rule, kernel)
            stored.append((layer, kernel_name, op, kernel))
            if hook_name != "promote_dtype":  # Embed and ConvTranspose: the op is promote_dtype itself
                layer.promote_dtype = promote_keeping_quantized  # type: ignore[attr-defined]
        update_op(layer, op, mode=Mode.SERVE)
    qarrays = quantize_kernels([(op, kernel) for _, _, op, kernel in stored])
    for (layer, kernel_name, op, _), q in zip(stored, qarrays, strict=True):
        setattr(layer, kernel_name, QuantizedWeight(q))
        drop_state(op, "centroids", "indices")  # stored in the QArray now: no second copy
    for _, layer, op in quantized_ops(served):
        if isinstance(op, QuantizedOp):  # calibration-only state: the QArray and static scales hold it
            drop_state(op, "stats", "weight_static")
            install_op(layer, op)  # frozen if nothing is left
    return served


def abstract_converted(
    model: nnx.Module | Callable[[], nnx.Module],
    rules: Iterable[Rule | Mapping[str, Any]],
    *,
    seed: int = 0,
) -> nnx.Module:
    """The converted model that ``convert(calibrate(quantize_model(model, rules), ...))`` would
    give, abstractly (``jax.ShapeDtypeStruct`` leaves, no compute, no calibration data): the target
    to restore a saved served model into, static activation scales included.

    ``model`` is the float model or a zero-argument function that builds it (then not even the
    float weights are materialized). Restore with orbax into its state:

    .. code-block:: python

        abstract = qjax.nn.abstract_converted(lambda: MyModel(nnx.Rngs(0)), rules)
        graphdef, target = nnx.split(abstract)
        served = nnx.merge(graphdef, ocp.StandardCheckpointer().restore(path, target))

    Save the served model before :func:`prepare_kernels` (its kernel layouts are not part of this
    structure; prepare again after restoring).
    """

    def build() -> nnx.Module:
        float_model = model if isinstance(model, nnx.Module) else model()
        if not isinstance(float_model, nnx.Module):
            raise TypeError(
                f"abstract_converted needs a flax NNX module or a function that builds one; got "
                f"{type(float_model).__name__}"
            )
        qmodel = quantize_model(float_model, rules, seed=seed)
        for _, _, op in quantized_ops(qmodel):
            rule = op.rule
            if isinstance(op, QuantizedOp) and rule.activation_scale == ActivationScale.STATIC:
                assert op.stats is not None and op.static is not None and rule.activations is not None
                placeholder = static_qparams(op.stats.get_value(), rule.observer, rule.activations)
                op.static.set_value(tuple(placeholder))
        return convert(qmodel)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedRuleWarning)  # the caller saw them when quantizing
        return nnx.eval_shape(build)


def prepare_kernels(model: nnx.Module, *, w8_layout: str = "kn") -> list[str]:
    """Store, in place, the weight of every served Linear layer that the W4A16 kernel covers in that
    kernel's layout (:func:`qjax.kernels.dispatch.prepare_w4a16`), so that its calls on the
    ``pallas``, ``mosaic_gpu`` and ``reference`` paths stop repacking the weight each time; with
    ``w8_layout="nk"`` also an ``(N, K)`` copy of every 8-bit weight (symmetric int8, e4m3;
    :func:`qjax.kernels.experimental.nk_layout.prepare_nk`), which the experimental ``*_nk`` W8A8 /
    FP8 kernels then read (the K-major operand of Hopper's 8-bit tensor cores). Returns the paths of
    the layers prepared.

    The ``QArray`` stays (the ``xla`` path, checkpoints and :func:`summary` read it), so a prepared
    layer holds its weight twice (:func:`summary`'s ``kernel_layout_bytes``). Prepare again after
    changing a converted weight."""
    if w8_layout not in ("kn", "nk"):
        raise ValueError(f"w8_layout={w8_layout!r}: expected 'kn' (8-bit weights as stored) or 'nk'")
    ops = quantized_ops(model)
    if not ops:
        raise ValueError("the model has no quantized layers; call qjax.nn.quantize_model and convert first")
    prepared = []
    for path, layer, op in ops:
        if op.mode != Mode.SERVE:
            raise ValueError(
                f"layer {path!r} is in mode {str(op.mode)!r}: prepare_kernels takes a converted model "
                "(served = qjax.nn.convert(model))"
            )
        if not isinstance(op, QuantizedContraction) or op.kind != OpKind.DOT_GENERAL:
            continue
        weight = getattr(layer, layer_hook(layer).kernel)[...]
        if not isinstance(weight, QArray):
            continue
        layout: Prepared | None = prepare_w4a16(weight)
        if layout is None and w8_layout == "nk":
            from qjax.kernels.experimental.nk_layout import prepare_nk  # named by w8_layout="nk"

            layout = prepare_nk(weight)
        if layout is not None:
            stateful_op(layer, op).prepared = KernelLayout(layout)
            prepared.append(path)
    return prepared


def _check_integer_conv(path: str, rule: Rule, kernel: jax.Array) -> None:
    """An integer convolution applies one scale per output channel and one per input tensor."""
    assert rule.weights is not None and rule.activations is not None
    grid = tiling.grid_shape(kernel.shape, tiling.block_shape(kernel.shape, rule.weights))
    if any(n > 1 for n in grid[:-1]):
        raise ValueError(
            f"layer {path!r}: a convolution's kernel scales must vary along the output channels only "
            f"(axis -1), but {rule.weights.granularity} gives the grid {grid}; use per_tensor or "
            "per_channel with axis=-1 (or drop the activation spec for weight-only serving)"
        )
    if rule.activations.granularity != Granularity.PER_TENSOR:
        raise ValueError(
            f"layer {path!r}: a convolution's input needs one scale (granularity='per_tensor'); "
            f"got {str(rule.activations.granularity)!r}"
        )


def summary(model: nnx.Module) -> list[dict[str, Any]]:
    """One row per quantizable layer: path, type, mode, formats, estimators, storage.

    Converted layers also report ``weight_bytes`` (the real storage of the ``QArray``: packed values,
    scales, zero points, k-means codebooks) and ``compression_ratio`` (float32 bytes over those)."""
    rows = []
    ops = {path: op for path, _, op in quantized_ops(model)}
    for path, layer in quantizable_layers(model):
        op = ops.get(path)
        row: dict[str, Any] = {"path": path, "layer": type(layer).__name__, "mode": "float"}
        if op is not None:
            rule = op.rule
            row.update(
                mode=str(op.mode),
                weights=None if rule.weights is None else rule.weights.dtype,
                weight_granularity=None if rule.weights is None else str(rule.weights.granularity),
                activations=None if rule.activations is None else rule.activations.dtype,
                activation_scale=None if rule.activations is None else str(rule.activation_scale),
                weight_estimator=str(rule.weight_estimator),
                activation_estimator=str(rule.activation_estimator) if rule.activations is not None else None,
            )
            kernel = getattr(layer, layer_hook(layer).kernel)[...]
            if isinstance(kernel, QArray):
                row["weight_bytes"] = kernel.nbytes
                row["compression_ratio"] = kernel.compression_ratio()
            if isinstance(op, QuantizedContraction) and op.prepared is not None:
                leaves = jax.tree_util.tree_leaves(op.prepared.get_value())
                row["kernel_layout_bytes"] = sum(int(leaf.nbytes) for leaf in leaves)
        rows.append(row)
    quantized_attention = {path: op for path, _, op in attention_ops(model)}
    for path, layer in attention_layers(model):
        att = quantized_attention.get(path)
        row = {"path": f"{path} (QK^T, PV)", "layer": type(layer).__name__, "mode": "float"}
        if att is not None and att.rule.activations is not None:
            row.update(
                mode=str(att.mode),
                activations=att.rule.activations.dtype,
                activation_scale=str(att.rule.activation_scale),
                activation_estimator=str(att.rule.activation_estimator),
            )
        rows.append(row)
    return rows


def learned_quantizer_params(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
    """The learned LSQ scales, LSQ+ offsets, PACT clips and k-means centroids of every quantized
    layer, by layer path."""
    out: dict[str, dict[str, jax.Array]] = {}
    for path, _, op in quantized_ops(model):
        params = {}
        for name in ("weight_scale", "centroids", "act_scale", "act_offset", "act_clip"):
            var = getattr(op, name, None)
            if var is not None:
                params[name] = var[...]
        if params:
            out[path] = params
    return out


__all__ = [
    "MODES",
    "Estimator",
    "Mode",
    "QuantizedWeight",
    "UnusedRuleWarning",
    "abstract_converted",
    "attention_ops",
    "calibrate",
    "convert",
    "float_modules",
    "learned_quantizer_params",
    "prepare_kernels",
    "quantizable_layers",
    "quantize_model",
    "quantized_ops",
    "set_mode",
    "summary",
]
