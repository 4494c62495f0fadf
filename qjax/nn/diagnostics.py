"""Per-layer PTQ diagnostics: how far each quantized layer is from its float original.

A layer's inputs are captured without touching the user's model code: for the length of one
forward pass, each Linear / Conv / Einsum of a *working copy* of the model gets a recording
hook in place of its own contraction hook (``dot_general``, ``conv_general_dilated``,
``einsum_op``), which logs the call and passes it on (:func:`record_hook_calls`). The float
model's log gives each layer's float input :math:`x`, operands and static arguments; the
quantized model's log gives its quantized op and kernel operand. Working copies (``nnx.clone``,
switched to ``eval()``) are used throughout, so neither model given is changed.

For a quantized layer with float kernel :math:`W` (from ``float_model``), effective quantized
kernel :math:`\\hat W` (fake-quantized in ``qat`` mode, dequantized in ``serve`` mode) and float
input :math:`x`:

.. math::

    \\mathrm{SQNR}(r, \\hat r) = 10 \\log_{10} \\frac{\\sum r^2}{\\sum (\\hat r - r)^2} \\ \\mathrm{dB}

* ``weight_sqnr_db``: :math:`\\mathrm{SQNR}(W, \\hat W)`;
* ``output_sqnr_db``: :math:`\\mathrm{SQNR}(y, \\hat y)` with :math:`y = \\mathrm{op}(x, W) + b` the
  float layer and :math:`\\hat y = \\mathrm{op}_q(x, \\hat W) + \\hat b` the quantized layer (its
  activation quantizer included) on the *same* float input: the layer's own error, not the error
  accumulated upstream;
* ``weight_clip_ratio`` / ``act_clip_ratio``: the share of elements of :math:`W` / :math:`x`
  outside the representable range :math:`[S(q_{min} - Z), S(q_{max} - Z)]` of their block
  (activation ranges: static, LSQ or PACT parameters where the layer has them, else the dynamic
  range the quantizer computes from :math:`x` itself);
* activation outliers, with channels on the last axis of :math:`x` (the input features of a Linear,
  the input channels of a channels-last Conv; for an Einsum, its input's last axis) and
  :math:`m_c = \\max |x_{\\cdot c}|`: ``act_max_over_median`` :math:`= \\max_c m_c /
  \\operatorname{median}_c m_c`, ``act_outlier_channels`` :math:`= \\frac1C \\#\\{c : m_c > k\\,
  \\operatorname{median}_c m_c\\}` (:math:`k` = ``outlier_factor``, 6 by default, as in
  LLM.int8()'s magnitude threshold), and ``act_kurtosis`` :math:`= \\mathbb{E}[(x-\\mu)^4] /
  \\sigma^4` over all elements (Pearson: 3 for a Gaussian, larger with heavy tails).

Metrics that do not apply are ``None``: activation metrics of weight-only rules (clipping) and of
``Embed`` layers (all activation and output metrics: their input is integer ids). For a
QAT-trained model the comparison with ``float_model`` includes the training drift of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from qjax.nn.hooks import layer_hook, quantizable_layers, wrapped_contractions
from qjax.nn.model import quantized_ops
from qjax.nn.ops import Mode, QuantizedContraction, QuantizedEmbedding, quantize_kernel, update_op
from qjax.numerics import QArray, calibrate, dequantize
from qjax.numerics.formats import CodebookFormat
from qjax.numerics.quantize import clipped_by_nearest
from qjax.numerics.spec import QuantSpec

OUTLIER_FACTOR = 6.0
Forward = Callable[[nnx.Module, Any], Any]

# -- pure metrics (float64 numpy) -----------------------------------------------------------------


def sqnr_db(reference: Any, approx: Any) -> float:
    """:math:`10 \\log_{10}(\\sum r^2 / \\sum (\\hat r - r)^2)`; ``inf`` when the error is zero."""
    r, e = _f64(reference), _f64(approx) - _f64(reference)
    return _sqnr_from_energies(float(np.sum(r * r)), float(np.sum(e * e)))


def _sqnr_from_energies(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def channel_outliers(x: Any, factor: float = OUTLIER_FACTOR) -> tuple[float, float]:
    """``(max_c m_c / median_c m_c, share of channels with m_c > factor * median)``.

    :math:`m_c = \\max |x_{\\cdot c}|` over every axis but the last. A zero median gives a ratio of
    ``inf`` (or 1 when every channel is zero).
    """
    a = np.abs(_f64(x))
    cmax = a.reshape(-1, a.shape[-1]).max(axis=0)
    med, top = float(np.median(cmax)), float(cmax.max())
    ratio = top / med if med > 0 else (math.inf if top > 0 else 1.0)
    return ratio, float(np.mean(cmax > factor * med))


def kurtosis(x: Any) -> float:
    """Pearson kurtosis :math:`\\mathbb{E}[(x-\\mu)^4] / \\sigma^4` of all elements (NaN if constant)."""
    d = _f64(x).reshape(-1)
    d = d - d.mean()
    m2 = float(np.mean(d * d))
    return float(np.mean(d**4)) / (m2 * m2) if m2 > 0 else math.nan


def _f64(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), dtype=np.float64)


def _outside(x: jax.Array, spec: QuantSpec, qparams: Any) -> tuple[int, int]:
    """``(elements of x that round-to-nearest clips, elements)``, in the integer domain
    (:func:`qjax.numerics.quantize.clipped_by_nearest`)."""
    return int(jnp.sum(clipped_by_nearest(x.astype(jnp.float32), spec, qparams))), int(x.size)


# -- recording the contraction hooks --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HookCall:
    """One call ``hook(*args, **kwargs)`` of a layer's contraction hook, and its ``output``.

    ``args[operand]`` is the layer's (promoted) input and ``args[operand + 1]`` its kernel operand
    (``operand`` is 1 for ``einsum_op``, whose first argument is the equation, else 0).
    """

    hook: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    operand: int
    output: jax.Array

    @property
    def lhs(self) -> jax.Array:
        return self.args[self.operand]

    @property
    def rhs(self) -> Any:
        return self.args[self.operand + 1]

    def rerun(self, hook: Callable[..., Any] | None = None, lhs: jax.Array | None = None) -> jax.Array:
        """The call again, with another hook (and its own kernel operand) or another input."""
        args = list(self.args)
        if lhs is not None:
            args[self.operand] = lhs
        return (hook or self.hook)(*args, **self.kwargs)


class _Recorder:
    """A contraction hook that logs each call (:class:`HookCall`) and passes it on."""

    def __init__(self, inner: Callable[..., Any], log: list[HookCall], operand: int, path: str):
        self.inner, self.log, self.operand, self.path = inner, log, operand, path

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        if isinstance(args[self.operand], jax.core.Tracer):
            raise ValueError(
                f"layer {self.path!r} was called under a JAX transformation (jit, vmap, scan, ...); "
                "diagnostics and bias correction record layer inputs eagerly: pass a forward "
                "function that calls the model without jit"
            )
        out = self.inner(*args, **kwargs)
        self.log.append(HookCall(self.inner, args, kwargs, self.operand, out))
        return out


@contextlib.contextmanager
def record_hook_calls(model: nnx.Module) -> Iterator[dict[str, list[HookCall]]]:
    """Log every contraction-hook call of ``model``'s Linear / Conv / Einsum layers, by layer path.

    The hooks are restored on exit. Run the forward eagerly inside the ``with`` block.
    """
    calls: dict[str, list[HookCall]] = {}

    def record(path: str, inner: Callable[..., Any], operand: int) -> _Recorder:
        calls[path] = []
        return _Recorder(inner, calls[path], operand, path)

    with wrapped_contractions(model, record):
        yield calls


def working_copy(model: nnx.Module) -> nnx.Module:
    """A clone of ``model`` in inference mode (``eval()``: running BatchNorm statistics, no dropout)."""
    copy = nnx.clone(model)
    copy.eval()
    return copy


def check_quantized(qmodel: nnx.Module) -> None:
    """``qmodel`` has quantized layers and none is still collecting calibration statistics."""
    ops = quantized_ops(qmodel)
    if not ops:
        raise ValueError("qmodel has no quantized layers; pass the model returned by qjax.nn.quantize_model")
    for path, _, op in ops:
        if op.mode == Mode.CALIBRATE:
            raise ValueError(
                f"layer {path!r} is in mode 'calibrate'; finish calibration first with "
                "qjax.nn.set_mode(qmodel, 'qat') (qjax.nn.calibrate ends in 'qat' mode)"
            )


def paired_calls(
    qmodel: nnx.Module, float_model: nnx.Module, batch: Any, forward: Forward | None, paths: Sequence[str]
) -> dict[str, list[tuple[HookCall, HookCall]]]:
    """``(float call, quantized call)`` pairs of each layer in ``paths`` on one batch (models: working
    copies, run eagerly)."""
    fwd = forward if forward is not None else (lambda m, b: m(b))
    with record_hook_calls(float_model) as float_calls:
        fwd(float_model, batch)
    with record_hook_calls(qmodel) as q_calls:
        fwd(qmodel, batch)
    out = {}
    for path in paths:
        fc, qc = float_calls.get(path), q_calls[path]
        if fc is None or len(fc) != len(qc):
            raise ValueError(
                f"layer {path!r} was called {len(qc)} time(s) in qmodel but "
                f"{'never' if fc is None else f'{len(fc)} time(s)'} in float_model; pass the float "
                "model that qjax.nn.quantize_model was given"
            )
        out[path] = list(zip(fc, qc, strict=True))
    return out


def layer_output(layer: nnx.Module, call: HookCall, y: jax.Array) -> jax.Array:
    """The layer's output from its contraction output ``y``: ``y`` plus the layer's bias, broadcast as
    Flax does (last axis for Linear / Conv; the kernel's output labels for Einsum)."""
    bias = getattr(layer, "bias", None)
    if bias is None:
        return y
    b = bias[...].astype(y.dtype)
    if isinstance(layer, nnx.Einsum):
        inputs, _, out = call.args[0].replace(" ", "").partition("->")
        rhs = inputs.split(",")[1]
        if "." in rhs or "." in out:
            raise ValueError(f"einsum {call.args[0]!r}: diagnostics need explicit labels (no '...')")
        shape = [layer.kernel_shape[rhs.index(c)] if c in rhs else 1 for c in out]
        return y + b.reshape(shape)
    return y + b.reshape((1,) * (y.ndim - 1) + (-1,))


# -- diagnostics ----------------------------------------------------------------------------------


def layer_diagnostics(
    qmodel: nnx.Module,
    float_model: nnx.Module,
    batch: Any,
    *,
    forward: Forward | None = None,
    outlier_factor: float = OUTLIER_FACTOR,
) -> list[dict[str, Any]]:
    """One row per quantized layer of ``qmodel``: the metrics of the module docstring.

    Args:
      qmodel: a model from :func:`qjax.nn.quantize_model` in ``qat`` or ``serve`` mode.
      float_model: the float model it was made from.
      batch: one input batch.
      forward: ``forward(model, batch)``, run eagerly; defaults to ``model(batch)``.
      outlier_factor: :math:`k` of ``act_outlier_channels``.
    """
    check_quantized(qmodel)
    qwork, fwork = working_copy(qmodel), working_copy(float_model)
    ops = quantized_ops(qwork)
    contractions = [p for p, _, op in ops if isinstance(op, QuantizedContraction)]
    pairs = paired_calls(qwork, fwork, batch, forward, contractions)
    float_layers = dict(quantizable_layers(fwork))
    rows = []
    for path, qlayer, op in ops:
        flayer = float_layers.get(path)
        if flayer is None or type(flayer) is not type(qlayer):
            raise ValueError(f"layer {path!r} of qmodel has no {type(qlayer).__name__} twin in float_model")
        rule = op.rule
        row: dict[str, Any] = {
            "path": path,
            "layer": type(qlayer).__name__,
            "weights": None if rule.weights is None else rule.weights.dtype,
            "activations": None if rule.activations is None else rule.activations.dtype,
        }
        row.update(_weight_stats(op, qlayer, flayer))
        row.update(_call_stats(op, qlayer, flayer, pairs.get(path, []), outlier_factor))
        rows.append(row)
    return rows


def _weight_stats(
    op: QuantizedContraction | QuantizedEmbedding, qlayer: nnx.Module, flayer: nnx.Module
) -> dict[str, float | None]:
    spec = op.rule.weights
    if spec is None:
        return {"weight_sqnr_db": None, "weight_clip_ratio": None}
    name = layer_hook(qlayer).kernel
    w = getattr(flayer, name)[...]
    stored = getattr(qlayer, name)[...]
    q = stored if isinstance(stored, QArray) else quantize_kernel(op, stored)
    clip = None
    if q.codebook is None:
        outside, total = _outside(w, spec, q.qparams)
        clip = outside / total
    return {"weight_sqnr_db": sqnr_db(w, dequantize(q)), "weight_clip_ratio": clip}


def _call_stats(
    op: QuantizedContraction | QuantizedEmbedding,
    qlayer: nnx.Module,
    flayer: nnx.Module,
    pairs: list[tuple[HookCall, HookCall]],
    outlier_factor: float,
) -> dict[str, float | None]:
    keys = ("output_sqnr_db", "act_clip_ratio", "act_max_over_median", "act_outlier_channels", "act_kurtosis")
    if not isinstance(op, QuantizedContraction) or not pairs:
        return dict.fromkeys(keys)
    signal = noise = 0.0
    outside = total = 0
    for fc, qc in pairs:
        y = _f64(layer_output(flayer, fc, fc.output))
        y_hat = _f64(layer_output(qlayer, qc, qc.rerun(lhs=fc.lhs)))
        signal += float(np.sum(y * y))
        noise += float(np.sum((y_hat - y) ** 2))
        counts = _activation_clipping(op, fc.lhs)
        if counts is not None:
            outside, total = outside + counts[0], total + counts[1]
    x = np.concatenate([_f64(fc.lhs).reshape(-1, fc.lhs.shape[-1]) for fc, _ in pairs])
    ratio, share = channel_outliers(x, outlier_factor)
    return {
        "output_sqnr_db": _sqnr_from_energies(signal, noise),
        "act_clip_ratio": outside / total if total else None,
        "act_max_over_median": ratio,
        "act_outlier_channels": share,
        "act_kurtosis": kurtosis(x),
    }


def _activation_clipping(op: QuantizedContraction, x: jax.Array) -> tuple[int, int] | None:
    """Elements of the input ``x`` outside the activation quantizer's range: its static, LSQ or PACT
    parameters, else the dynamic range it computes from ``x``."""
    spec = op.rule.activations
    if spec is None or isinstance(spec.format, CodebookFormat):
        return None
    qparams = op.input_qparams()
    if qparams is None:
        qparams = calibrate(x, spec)
    return _outside(x, spec, qparams)


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, digits: int = 4
) -> str:
    """A markdown table of ``rows`` (dicts); floats with ``digits`` significant digits, ``None`` as ``-``.

    ``columns`` defaults to every key, in order of first appearance.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def gradient_sqnr(model: nnx.Module, loss_fn: Callable[[Any, Any], Any], batch: Any) -> dict[str, float]:
    r"""The SQNR (dB, :func:`sqnr_db`) of each kernel gradient :math:`\partial L/\partial W` of
    the layers whose rule quantizes the backward pass (``Rule.gradients``), against the gradient
    of the same network with a float backward pass (same forward quantization, same batch):
    the error that quantizing the backward contractions alone adds. Runs on copies: ``model``'s
    state (key streams, amax histories) is unchanged. Layer path -> dB."""
    ops = {path: op for path, _, op in quantized_ops(model) if getattr(op.rule, "gradients", None)}
    if not ops:
        return {}
    grad = nnx.jit(nnx.grad(loss_fn))
    quantized = grad(nnx.clone(model), batch)
    reference_model = nnx.clone(model)
    for path, layer, op in quantized_ops(reference_model):
        if path in ops and isinstance(op, QuantizedContraction):
            update_op(layer, op, rule=dataclasses.replace(op.rule, gradients=None))
    reference = grad(reference_model, batch)
    flat_q, flat_r = dict(nnx.to_flat_state(quantized)), dict(nnx.to_flat_state(reference))
    out = {}
    for path in ops:
        key = (*(int(p) if p.isdigit() else p for p in path.split("/")), "kernel")
        if key in flat_q:
            out[path] = sqnr_db(flat_r[key][...], flat_q[key][...])
    return out


__all__ = [
    "OUTLIER_FACTOR",
    "HookCall",
    "channel_outliers",
    "format_table",
    "gradient_sqnr",
    "kurtosis",
    "layer_diagnostics",
    "record_hook_calls",
    "sqnr_db",
]
