"""AdaRound on a quantized NNX model: layer by layer, in execution order, earlier layers already done.

.. code-block:: python

    qmodel = qjax.nn.quantize_model(model, [Rule(path=".*", weights=QuantSpec(dtype="int4",
                                    calibration="mse", granularity="per_channel", axis=-1))])
    qmodel = qjax.methods.adaround(qmodel, model, calibration_batches,
                                   config=AdaRoundConfig(iterations=2000))

For each selected layer :math:`l` (a Linear, Conv or Einsum whose rule has integer weights), in the
order the forward pass first calls them:

1. the float model is run on the batches and the layer's float input :math:`x` and float output
   :math:`W x` are recorded; the partially quantized model (layers before :math:`l` already
   AdaRound'ed, every activation quantizer active) is run and the layer's input :math:`\\tilde x`
   is recorded and passed through the layer's own input quantizer, as the layer will see it;
2. the grid is fixed: :math:`S` (and :math:`Z`) from the rule's weight spec and its calibration on
   the float kernel (an LSQ rule's learned step size where it has one);
3. :func:`~qjax.methods.adaround_core.optimize_rounding` learns :math:`V` on the samples (axis 0 of
   the layer's input is the sample axis), with the target :math:`f(W x + b)` and the prediction
   :math:`f(\\tilde W \\tilde x + b)`. ``activation=None`` (default): :math:`f` = identity, the
   pre-activation output, where the bias cancels; a callable (e.g. ``jax.nn.relu``, or a mapping
   from layer path to callable) gives the paper's post-nonlinearity variant;
4. the kernel becomes :math:`\\hat W` (dequantized, on the grid) and the layer's weight quantizer is
   pinned to :math:`S, Z` with nearest rounding, so that the fake-quant forward, ``convert`` and the
   diagnostics all re-quantize :math:`\\hat W` to itself, bit for bit.

Pinning the grid: the layer's :class:`~qjax.nn.QuantizedOp` keeps :math:`S, Z` as static weight
parameters (its ``weight_static`` variable; an LSQ rule's learned step size is set instead), so
symmetric and asymmetric specs keep their grid exactly.

``qmodel`` and ``float_model`` are left unchanged. The forwards that record a layer's inputs run
under ``jax.jit`` on inference-mode copies (``eval()``) and stop tracing after the layer's last call;
``forward`` must be traceable and must not ``jit`` the model itself.

Convergence: :math:`\\lambda`'s pull on :math:`h` is fixed while the reconstruction term grows with
the size of the layer's outputs (as in the paper's objective), and Adam moves :math:`V` by about
``lr`` per step. A layer that ends with more than 10 % of its :math:`h(V)` inside (0.01, 0.99), or
with a larger error than nearest rounding, is logged as a warning (and shows in :class:`LayerReport`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from qjax.methods.adaround_core import (
    AdaRoundConfig,
    RoundingGrid,
    dataset_errors,
    hard_weight,
    optimize_rounding,
    rectified_sigmoid,
    rounding_grid,
)
from qjax.nn.diagnostics import HookCall, check_quantized, layer_output, working_copy
from qjax.nn.hooks import layer_hook, quantizable_layers, wrapped_contractions
from qjax.nn.model import pin_weight_qparams, quantized_ops
from qjax.nn.ops import QuantizedContraction
from qjax.numerics import QParams, QuantSpec, calibrate, quantize_dequantize, tiling
from qjax.numerics.formats import MIN_SCALE, IntFormat
from qjax.numerics.rounding import Rounding

logger = logging.getLogger("qjax")
_calibrate = jax.jit(calibrate, static_argnums=1)

M = TypeVar("M", bound=nnx.Module)
Forward = Callable[[nnx.Module, Any], Any]
Activation = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What AdaRound did to one layer.

    ``error_*`` are :func:`~qjax.methods.adaround_core.reconstruction_error` over all the layer's
    samples: ``error_nearest`` with the nearest-rounded kernel, ``error_adaround`` with
    :math:`\\hat W` (both on the quantized model's input :math:`\\tilde x`); ``soft_fraction`` the
    share of :math:`h(V)` strictly inside (0.01, 0.99) at the end; ``flipped_fraction`` the share of
    weights rounded the other way than nearest rounding.
    """

    path: str
    samples: int
    error_nearest: float
    error_adaround: float
    soft_fraction: float
    flipped_fraction: float
    seconds: float


def adaround(
    qmodel: M,
    float_model: nnx.Module,
    batches: Iterable[Any],
    *,
    config: AdaRoundConfig | None = None,
    forward: Forward | None = None,
    paths: str = ".*",
    activation: Activation | Mapping[str, Activation] | None = None,
    report: list[LayerReport] | None = None,
) -> M:
    """A copy of ``qmodel`` whose selected kernels are AdaRound'ed (see the module docstring).

    Args:
      qmodel: a model from :func:`qjax.nn.quantize_model` in ``qat`` mode (static activation
        scales calibrated, if its rules use them).
      float_model: the float model it was made from (left unchanged).
      batches: calibration input batches (read once and kept for the per-layer passes).
      config: the optimisation settings (default :class:`AdaRoundConfig()`).
      forward: ``forward(model, batch)``, traced under ``jax.jit``; defaults to ``model(batch)``.
      paths: regular expression (full match) of the layers to AdaRound; the others keep their
        rule's rounding. A selected layer must have an integer weight spec.
      activation: :math:`f` of the objective: ``None`` (pre-activation output), a callable, or a
        mapping from layer path to callable (layers not in it: ``None``).
      report: a list that receives one :class:`LayerReport` per layer, in processing order.
    """
    config = AdaRoundConfig() if config is None else config
    check_quantized(qmodel)
    batches = list(batches)
    if not batches:
        raise ValueError("adaround got no batches; pass an iterable of at least one input batch")
    fwd = forward if forward is not None else (lambda m, b: m(b))
    result = nnx.clone(qmodel)
    qwork, fwork = working_copy(result), working_copy(float_model)
    selected = _selected_layers(result, paths)
    counts = _call_counts(fwork, batches[0], fwd)
    order = list(counts)
    missing = [p for p in selected if p not in order]
    if missing:
        raise ValueError(
            f"layer(s) {missing} were not called when float_model ran the first batch; pass the "
            "float model that qjax.nn.quantize_model was given (and a forward that uses them)"
        )
    work = _Work(fwork, qwork, batches, fwd, counts)
    targets = {p: layer for p, layer, _ in quantized_ops(result)}
    for index, path in enumerate(p for p in order if p in selected):
        f = activation.get(path) if isinstance(activation, Mapping) else activation
        start = time.perf_counter()
        w_hat, qp, row = _adaround_layer(path, work, f, config, index)
        for target_layer in (dict(quantizable_layers(qwork))[path], targets[path]):
            pin_weight_qparams(target_layer, w_hat, qp)
        row = dataclasses.replace(row, seconds=time.perf_counter() - start)
        _log(row)
        if report is not None:
            report.append(row)
    return result


SOFT_WARNING = 0.1


def _log(row: LayerReport) -> None:
    logger.info(
        "adaround %s: error %.4g -> %.4g (nearest -> adaround), %.1f%% flipped, %.1f%% soft, %.1fs",
        row.path, row.error_nearest, row.error_adaround, 100 * row.flipped_fraction, 100 * row.soft_fraction,
        row.seconds,
    )  # fmt: skip
    if row.soft_fraction > SOFT_WARNING or row.error_adaround > row.error_nearest:
        logger.warning(
            "adaround %s: %.1f%% of h(V) still soft (in (0.01, 0.99)), error %.4g vs %.4g with nearest "
            "rounding: the regulariser has not won over the reconstruction; raise iterations, lr or "
            "lambda_ (its pull is relative to the size of the layer's outputs)",
            row.path, 100 * row.soft_fraction, row.error_adaround, row.error_nearest,
        )  # fmt: skip


def _selected_layers(model: nnx.Module, paths: str) -> list[str]:
    try:
        pattern = re.compile(paths)
    except re.error as e:
        raise ValueError(f"paths={paths!r} is not a valid regular expression ({e})") from None
    out = []
    for path, _, op in quantized_ops(model):
        if not isinstance(op, QuantizedContraction) or op.rule.weights is None or not pattern.fullmatch(path):
            continue  # Embed tables and activation-only rules have nothing to round
        spec = op.rule.weights
        if not isinstance(spec.format, IntFormat):
            raise ValueError(
                f"layer {path!r}: AdaRound rounds onto an integer grid, but its weight dtype is "
                f"{spec.dtype!r}; leave it out with paths=<regex of the integer layers>"
            )
        out.append(path)
    if not out:
        raise ValueError(
            f"no layer of qmodel matches paths={paths!r} with an integer weight spec; check the "
            "rules given to qjax.nn.quantize_model"
        )
    return out


# -- one layer ------------------------------------------------------------------------------------


class _Work(NamedTuple):
    """Inference-mode copies of the models, the calibration batches, the forward that runs them and
    the calls per layer in one forward (in the order of the first calls)."""

    float_model: nnx.Module
    qmodel: nnx.Module
    batches: list[Any]
    forward: Forward
    counts: dict[str, int]


def _adaround_layer(
    path: str, work: _Work, f: Activation | None, config: AdaRoundConfig, index: int
) -> tuple[jax.Array, QParams, LayerReport]:
    """``(W_hat, its grid's parameters, report)`` of the layer at ``path`` (``seconds`` left at 0)."""
    layer = dict(quantizable_layers(work.qmodel))[path]
    float_layer = dict(quantizable_layers(work.float_model))[path]
    op = getattr(layer, layer_hook(layer).hook)
    assert isinstance(op, QuantizedContraction) and op.rule.weights is not None
    spec = op.rule.weights
    kernel = _kernel(path, layer)
    key = jax.random.fold_in(jax.random.key(config.seed), index)
    fcalls = _calls(work.float_model, path, work, key, outputs=True)
    qcalls = _calls(work.qmodel, path, work, key, outputs=False)
    _check_calls(path, kernel, fcalls, qcalls)
    inputs = jnp.concatenate([qc.lhs for qc in qcalls])
    targets = jnp.concatenate(
        [fc.output if f is None else f(layer_output(float_layer, fc, fc.output)) for fc in fcalls]
    )
    if config.samples is not None:
        inputs, targets = inputs[: config.samples], targets[: config.samples]
    apply = _layer_apply(layer, fcalls[0], f)
    qp = _weight_qparams(op, kernel, spec)
    grid = _rounding_grid(kernel, spec, qp)
    v = optimize_rounding(apply, grid, inputs, targets, config, seed=(config.seed, index))
    w_hat, nearest, soft, flipped = _finish(v, grid, kernel, spec, qp)
    errors = dataset_errors(apply, [nearest, w_hat], inputs, targets)
    row = LayerReport(
        path=path,
        samples=int(inputs.shape[0]),
        error_nearest=errors[0],
        error_adaround=errors[1],
        soft_fraction=float(soft),
        flipped_fraction=float(flipped),
        seconds=0.0,
    )
    return w_hat, qp, row


_rounding_grid = jax.jit(rounding_grid, static_argnums=1)


@functools.partial(jax.jit, static_argnums=3)
def _finish(
    v: jax.Array, grid: RoundingGrid, kernel: jax.Array, spec: QuantSpec, qp: QParams
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(W_hat, nearest-rounded W, share of soft h, share rounded unlike nearest)``."""
    w_hat = hard_weight(v, grid)
    nearest = quantize_dequantize(kernel, dataclasses.replace(spec, rounding=Rounding.NEAREST), qparams=qp)
    h = rectified_sigmoid(v)
    soft = jnp.mean(((h > 0.01) & (h < 0.99)).astype(jnp.float32))
    return w_hat, nearest, soft, jnp.mean((w_hat != nearest).astype(jnp.float32))


def _kernel(path: str, layer: nnx.Module) -> jax.Array:
    if getattr(layer, "mask", None) is not None:
        raise ValueError(f"layer {path!r}: fold the Conv mask into the kernel before AdaRound")
    kernel = layer.kernel[...]  # type: ignore[attr-defined]
    if kernel.dtype != jnp.float32:
        raise ValueError(
            f"layer {path!r}: AdaRound stores the rounded kernel in place and needs a float32 kernel "
            f"(param_dtype); got {kernel.dtype}"
        )
    return kernel


def _calls(model: nnx.Module, path: str, work: _Work, key: jax.Array, outputs: bool) -> list[HookCall]:
    """The calls of the layer at ``path`` on every batch, traced under ``jit`` and cut short after the
    last one: the concrete input (through the layer's own input quantizer, if it has one) and, if
    ``outputs``, the float output (else ``None``); the kernel operand as its shape and dtype."""
    graphdef, state = nnx.split(model)
    static: list[tuple[Any, ...]] = []  # per call: hook, arguments, keyword arguments, operand index

    def run(state: Any, batch: Any, key: jax.Array) -> list[tuple[jax.Array, Any]]:
        m = nnx.merge(graphdef, state)
        stop = work.counts[path]
        with _recording(m, path, stop_after=stop, run_inner=outputs) as log, contextlib.suppress(_Stop):
            work.forward(m, batch)
        static[:] = [(c.hook, _with_rhs_shape(c), c.kwargs, c.operand) for c in log]
        return [(_layer_input(c.hook, c.lhs, key), c.output) for c in log]

    traced = jax.jit(run)
    calls = []
    for batch in work.batches:
        arrays = traced(state, batch, key)  # fills `static` when it traces
        for (hook, args, kwargs, operand), (lhs, out) in zip(static, arrays, strict=True):
            a = list(args)
            a[operand] = lhs
            calls.append(HookCall(hook, tuple(a), kwargs, operand, out))
    return calls


def _with_rhs_shape(call: HookCall) -> tuple[Any, ...]:
    args = list(call.args)
    rhs = args[call.operand + 1]
    args[call.operand], args[call.operand + 1] = None, jax.ShapeDtypeStruct(rhs.shape, rhs.dtype)
    return tuple(args)


def _static_args(call: HookCall) -> tuple[list[Any], dict[str, Any]]:
    args = list(call.args)
    args[call.operand] = args[call.operand + 1] = None
    return args, call.kwargs


def _check_calls(path: str, kernel: jax.Array, fcalls: list[HookCall], qcalls: list[HookCall]) -> None:
    if not fcalls or len(fcalls) != len(qcalls):
        raise ValueError(
            f"layer {path!r} was called {len(qcalls)} time(s) in qmodel but {len(fcalls)} time(s) in "
            "float_model on the same batches; pass the float model that qjax.nn.quantize_model was given"
        )
    first = fcalls[0]
    if tuple(first.rhs.shape) != tuple(kernel.shape):
        raise ValueError(
            f"layer {path!r}: its kernel {tuple(kernel.shape)} reaches the contraction with shape "
            f"{tuple(first.rhs.shape)}; AdaRound needs the kernel passed as it is"
        )
    for call in (*fcalls, *qcalls):
        same = tuple(call.lhs.shape[1:]) == tuple(first.lhs.shape[1:])
        try:
            same = same and bool(_static_args(call) == _static_args(first))
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(
                f"layer {path!r} was called with different arguments or input shapes "
                f"({tuple(call.lhs.shape)} vs {tuple(first.lhs.shape)}); AdaRound stacks its inputs "
                "along axis 0 and needs the other axes and the contraction's settings to agree"
            )


def _layer_input(op: Any, x: jax.Array, key: jax.Array) -> jax.Array:
    """The input as the layer's own input quantizer (if ``op`` is one) passes it to the contraction."""
    spec = op.rule.activations if isinstance(op, QuantizedContraction) else None
    if spec is None:
        return x
    return quantize_dequantize(x, spec, key=key, qparams=op.input_qparams())


def _layer_apply(layer: nnx.Module, call: HookCall, f: Activation | None) -> Callable[..., jax.Array]:
    """``apply(x, w)``: the float contraction of ``call`` on another input and kernel (then the
    layer's bias and ``f``, when ``f`` is given)."""
    args, kwargs = _static_args(call)
    template = HookCall(call.hook, tuple(args), kwargs, call.operand, call.output[:0])
    dtype = call.rhs.dtype

    def apply(x: jax.Array, w: jax.Array) -> jax.Array:
        a = list(args)
        a[call.operand], a[call.operand + 1] = x, w.astype(dtype)
        y = call.hook(*a, **kwargs)
        return y if f is None else f(layer_output(layer, template, y))

    return apply


def _weight_qparams(op: QuantizedContraction, kernel: jax.Array, spec: QuantSpec) -> QParams:
    """The grid of the kernel: pinned parameters, an LSQ step size, or the spec's calibration."""
    pinned = op.weight_qparams()
    if pinned is not None:
        return pinned
    if op.weight_scale is not None:
        grid = tiling.grid_shape(kernel.shape, tiling.block_shape(kernel.shape, spec))
        scale = jnp.broadcast_to(op.weight_scale[...].astype(jnp.float32), grid)
        return QParams(jnp.maximum(scale, MIN_SCALE))
    return _calibrate(kernel, spec)


# -- recording a layer's contraction ----------------------------------------------------------------


class _Stop(Exception):
    """Raised by a recorder after the layer's last call: the rest of the forward is not traced."""


class _Recorder:
    """A contraction hook that counts the calls of its layer in ``counts`` (first calls first) and,
    when ``log`` is given, logs them (:class:`HookCall`; the output only if ``run_inner``) and stops
    the forward after ``stop_after`` calls."""

    def __init__(
        self,
        inner: Callable[..., Any],
        operand: int,
        path: str,
        counts: dict[str, int],
        log: list[HookCall] | None,
        stop_after: int | None,
        run_inner: bool,
    ):
        self.inner, self.operand, self.path, self.counts = inner, operand, path, counts
        self.log, self.stop_after, self.run_inner = log, stop_after, run_inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.counts[self.path] = self.counts.get(self.path, 0) + 1
        if self.log is None:
            return self.inner(*args, **kwargs)
        out = self.inner(*args, **kwargs) if self.run_inner else None
        self.log.append(HookCall(self.inner, args, kwargs, self.operand, out))  # type: ignore[arg-type]
        if len(self.log) == self.stop_after:
            raise _Stop
        return out


@contextlib.contextmanager
def _recording(
    model: nnx.Module,
    path: str | None,
    counts: dict[str, int] | None = None,
    stop_after: int | None = None,
    run_inner: bool = True,
) -> Iterator[list[HookCall]]:
    """Log the contraction calls of the layer at ``path`` (``None``: log none, only count the calls
    of every layer in ``counts``); the hooks are restored on exit."""
    log: list[HookCall] = []
    tally = {} if counts is None else counts

    def record(p: str, inner: Callable[..., Any], operand: int) -> _Recorder:
        return _Recorder(inner, operand, p, tally, log if path else None, stop_after, run_inner)

    with wrapped_contractions(model, record, None if path is None else {path}):
        yield log


def _call_counts(model: nnx.Module, batch: Any, fwd: Forward) -> dict[str, int]:
    """Calls per layer on ``batch``, in the order of the first calls (not the attribute order), from
    an abstract evaluation (nothing is computed)."""
    graphdef, state = nnx.split(model)
    counts: dict[str, int] = {}

    def run(state: Any, batch: Any) -> None:
        m = nnx.merge(graphdef, state)
        with _recording(m, None, counts):
            fwd(m, batch)

    jax.eval_shape(run, state, batch)
    return counts


__all__ = ["AdaRoundConfig", "LayerReport", "adaround"]
