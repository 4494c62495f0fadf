"""Rewrite a model's weights for post-training quantization: batch-norm folding, bias correction.

**Batch-norm folding.** An inference-mode ``nnx.BatchNorm`` right after a Conv or Linear is an
affine map per output channel :math:`c`, so it merges into the layer:

.. math::

    s_c = \\frac{\\gamma_c}{\\sqrt{\\sigma^2_c + \\epsilon}}, \\qquad
    W'_{\\dots c} = W_{\\dots c}\\, s_c, \\qquad b'_c = (b_c - \\mu_c)\\, s_c + \\beta_c

(:math:`\\mu, \\sigma^2`: running statistics; :math:`\\gamma, \\beta`: the BatchNorm's scale and
bias, 1 and 0 when it has none; :math:`b = 0` when the layer has no bias). Quantizing the folded
kernel is what integer inference executes, so fold before :func:`qjax.nn.quantize_model`.

**Bias correction** (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2, data-aware variant).
Weight quantization shifts the mean of a layer's output: with :math:`\\epsilon = \\hat W - W`,
:math:`\\mathbb{E}[\\hat W x] - \\mathbb{E}[W x] = \\epsilon\\, \\mathbb{E}[x]`. The correction

.. math::

    \\delta_c = \\mathbb{E}\\big[\\mathrm{op}_q(x, \\hat W) - \\mathrm{op}(x, W)\\big]_c,
    \\qquad \\hat b \\leftarrow \\hat b - \\delta

is measured on calibration batches, the mean running over every output element of channel
:math:`c` (batch, tokens, spatial positions). For a weight-only Linear layer this is exactly
:math:`\\epsilon^\\top \\mathbb{E}[x]`; for a Conv it accounts for the zero padding at the borders;
with quantized activations it also removes the mean error of the input quantizer.
"""

from __future__ import annotations

import difflib
import enum
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from qjax.nn.diagnostics import (
    Forward,
    HookCall,
    check_quantized,
    paired_calls,
    working_copy,
)
from qjax.nn.hooks import OpKind, join_path
from qjax.nn.model import quantized_ops
from qjax.nn.ops import QuantizedContraction

logger = logging.getLogger("qjax")

# -- batch-norm folding ---------------------------------------------------------------------------


class FoldedBatchNorm(nnx.Module):
    """The identity left where a BatchNorm was folded into the preceding layer.

    It accepts BatchNorm's call signature and its ``use_running_average`` view / attribute, so model
    code, ``model.eval()`` and ``nnx.view(model, use_running_average=...)`` keep working.
    """

    def __init__(self, num_features: int):
        self.num_features = num_features
        self.use_running_average: bool | None = True

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        return x

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``; a folded BatchNorm behaves the same in every mode."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


def fold_batchnorm_params(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    offset: jax.Array | None,
    epsilon: float,
) -> tuple[jax.Array, jax.Array]:
    """``(W', b')`` of the module docstring; the output channels are the kernel's last axis.

    Computed in float32 and returned in the kernel's dtype.
    """
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    s = jax.lax.rsqrt(f32(var) + jnp.float32(epsilon))
    if scale is not None:
        s = s * f32(scale)
    b = jnp.zeros_like(s) if bias is None else f32(bias)
    new_bias = (b - f32(mean)) * s
    if offset is not None:
        new_bias = new_bias + f32(offset)
    dtype = jnp.result_type(kernel)
    k = f32(kernel)
    return (k * s.reshape((1,) * (k.ndim - 1) + (-1,))).astype(dtype), new_bias.astype(dtype)


def fold_batchnorm(model: nnx.Module, pairs: Sequence[tuple[str, str]]) -> nnx.Module:
    """A copy of ``model`` with each ``(layer_path, batchnorm_path)`` pair folded (``model`` unchanged).

    Paths are written as in :class:`qjax.nn.Rule` (``"blocks/0/conv"``). Each layer, an
    ``nnx.Conv`` or ``nnx.Linear``, gets the folded kernel and a bias (created if it had none); each
    BatchNorm becomes a :class:`FoldedBatchNorm` (the identity). The copy equals ``model`` in
    inference mode (running statistics) only where each BatchNorm directly consumes its layer's
    output: that is the caller's claim, which NNX's module graph cannot check.
    """
    pairs = _check_pairs(pairs)
    folded = nnx.clone(model)
    graph = nnx.iter_graph(folded)
    nodes = {join_path(parts): (parts, node) for parts, node in graph if isinstance(node, nnx.Module)}
    for layer_path, bn_path in pairs:
        layer = _find(nodes, layer_path, (nnx.Linear, nnx.Conv))
        bn = _find(nodes, bn_path, (nnx.BatchNorm,))
        _check_foldable(layer_path, layer, bn_path, bn)
        kernel, bias = fold_batchnorm_params(
            layer.kernel[...],
            None if layer.bias is None else layer.bias[...],
            bn.mean[...],
            bn.var[...],
            None if bn.scale is None else bn.scale[...],
            None if bn.bias is None else bn.bias[...],
            bn.epsilon,
        )
        layer.kernel.set_value(kernel)
        _set_bias(layer, bias)
        _replace(folded, nodes[bn_path][0], FoldedBatchNorm(bn.num_features))
    return folded


def _check_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
        raise TypeError("pairs must be a list of (layer_path, batchnorm_path); wrap a single pair in a list")
    out = []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TypeError(f"pair {pair!r} must be (layer_path, batchnorm_path), two path strings")
        out.append((pair[0], pair[1]))
    for i, name in ((0, "layer"), (1, "BatchNorm")):
        seen = [p[i] for p in out]
        dup = sorted({p for p in seen if seen.count(p) > 1})
        if dup:
            raise ValueError(f"{name} {dup[0]!r} appears in more than one pair; fold each one once")
    return out


def _find(nodes: dict[str, tuple[Any, nnx.Module]], path: str, types: tuple[type, ...]) -> Any:
    if path not in nodes:
        hint = difflib.get_close_matches(path, [p for p in nodes if p], n=1)
        did = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"no module at path {path!r}{did} (paths are written like 'blocks/0/conv')")
    node = nodes[path][1]
    if not isinstance(node, types):
        want = " or ".join(f"nnx.{t.__name__}" for t in types)
        raise TypeError(f"module {path!r} is a {type(node).__name__}; expected {want}")
    return node


def _check_foldable(layer_path: str, layer: Any, bn_path: str, bn: nnx.BatchNorm) -> None:
    hook = getattr(layer, "conv_general_dilated" if isinstance(layer, nnx.Conv) else "dot_general", None)
    if isinstance(hook, QuantizedContraction):
        raise ValueError(
            f"layer {layer_path!r} is already quantized; fold batch norms into the float model before "
            "qjax.nn.quantize_model, so that the folded kernel is what gets quantized"
        )
    features = layer.kernel[...].shape[-1]
    if bn.num_features != features:
        raise ValueError(
            f"BatchNorm {bn_path!r} has {bn.num_features} features but layer {layer_path!r} has "
            f"{features} outputs; pair each BatchNorm with the layer that feeds it"
        )
    last = len(layer.kernel_size) + 1 if isinstance(layer, nnx.Conv) else None
    if bn.axis != -1 and bn.axis != last:
        raise ValueError(
            f"BatchNorm {bn_path!r} normalizes axis={bn.axis}, but layer {layer_path!r} puts its output "
            "features on the last axis; only channels-last batch norms (axis=-1) fold"
        )


def _set_bias(layer: Any, bias: jax.Array) -> None:
    if layer.bias is None:
        layer.bias = nnx.Param(bias)
        layer.use_bias = True
    else:
        layer.bias.set_value(bias.astype(layer.bias[...].dtype))


def _replace(root: nnx.Module, parts: tuple[Any, ...], new: nnx.Module) -> None:
    """Put ``new`` at ``parts`` in ``root``'s graph: an attribute, or an item of an nnx.List / Dict."""
    parent: Any = root
    for p in parts[:-1]:
        parent = (
            parent[p] if isinstance(p, int) or isinstance(parent, nnx.Dict | dict) else getattr(parent, p)
        )
    key = parts[-1]
    if isinstance(key, int) or isinstance(parent, nnx.Dict | dict):
        parent[key] = new
    else:
        setattr(parent, key, new)


# -- bias correction ------------------------------------------------------------------------------


class CorrectionInputs(enum.StrEnum):
    """Where the layer input :math:`x` of bias correction's expectation comes from (see
    :func:`bias_correction`)."""

    FLOAT = "float"  # the layer's input in the float model
    QUANTIZED = "quantized"  # the layer's input in the quantized (and upstream-corrected) model


def bias_correction(
    qmodel: nnx.Module,
    float_model: nnx.Module,
    batches: Iterable[Any],
    *,
    forward: Forward | None = None,
    inputs: CorrectionInputs | str = CorrectionInputs.FLOAT,
    create_bias: bool = True,
) -> nnx.Module:
    """A copy of ``qmodel`` whose quantized Linear / Conv biases are corrected (``qmodel`` unchanged).

    Args:
      qmodel: a model from :func:`qjax.nn.quantize_model` (``qat`` or ``serve`` mode).
      float_model: the float model it was made from.
      batches: calibration input batches (an iterable, read once).
      forward: ``forward(model, batch)``, run eagerly on inference-mode copies; defaults to
        ``model(batch)``.
      inputs: where the layer input :math:`x` of the expectation comes from.
        ``"float"`` (default): the layer's input in ``float_model``, the distribution its float
        weights were fit to and the one of the paper's derivation (which reads :math:`\\mathbb{E}[x]`
        off the float model's batch-norm statistics); every layer is corrected from the same passes,
        independently of the others. ``"quantized"``: the layer's input in the quantized model,
        corrected layer by layer in graph order (one pass over the batches per layer), so each
        correction sees the upstream layers already quantized and corrected: the input the layer
        meets at inference.
      create_bias: give a layer without a bias one, set to :math:`-\\delta` (the correction needs a
        bias); ``False`` leaves such layers uncorrected (logged).

    Einsum layers are left as they are (their bias axes follow the equation); this is logged.
    """
    if inputs not in (CorrectionInputs.FLOAT, CorrectionInputs.QUANTIZED):
        raise ValueError(f"inputs={inputs!r} is not one of 'float', 'quantized'")
    inputs = CorrectionInputs(inputs)
    check_quantized(qmodel)
    batches = list(batches)
    if not batches:
        raise ValueError("bias_correction got no batches; pass an iterable of at least one input batch")
    corrected = nnx.clone(qmodel)
    ops = quantized_ops(corrected)
    paths = [p for p, _, op in ops if isinstance(op, QuantizedContraction) and op.kind != OpKind.EINSUM]
    skipped = [p for p, _, op in ops if isinstance(op, QuantizedContraction) and op.kind == OpKind.EINSUM]
    if skipped:
        logger.info("bias correction leaves Einsum layers as they are: %s", ", ".join(skipped))
    layers = {p: layer for p, layer, _ in ops}
    fwork, qwork = working_copy(float_model), working_copy(corrected)
    work_layers = {p: layer for p, layer, _ in quantized_ops(qwork)}
    for group in [paths] if inputs == CorrectionInputs.FLOAT else [[p] for p in paths]:
        for path, delta in mean_output_error(qwork, fwork, batches, group, forward, inputs).items():
            if _correct_bias(layers[path], path, delta, create_bias):
                _correct_bias(work_layers[path], path, delta, create_bias)  # later layers see it
    return corrected


def mean_output_error(
    qmodel: nnx.Module,
    float_model: nnx.Module,
    batches: Sequence[Any],
    paths: Sequence[str],
    forward: Forward | None = None,
    inputs: CorrectionInputs | str = CorrectionInputs.FLOAT,
) -> dict[str, np.ndarray]:
    """:math:`\\delta` of the module docstring for each layer in ``paths`` (float64, one entry per
    output channel): the mean of :math:`\\mathrm{op}_q(x, \\hat W) - \\mathrm{op}(x, W)` over the
    batches, with :math:`x` the layer's input in ``float_model`` (``inputs="float"``) or in
    ``qmodel`` (``"quantized"``). Both models run eagerly as given (pass inference-mode copies)."""
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(paths, 0)
    for batch in batches:
        for path, pairs in paired_calls(qmodel, float_model, batch, forward, paths).items():
            for fc, qc in pairs:
                d = _output_error(fc, qc, inputs)
                sums[path] = sums.get(path, 0.0) + d.sum(axis=0)
                counts[path] += d.shape[0]
    missing = [p for p in paths if counts[p] == 0]
    if missing:
        logger.info("layers never called by the forward pass, left uncorrected: %s", ", ".join(missing))
    return {p: sums[p] / counts[p] for p in paths if counts[p]}


def _output_error(fc: HookCall, qc: HookCall, inputs: CorrectionInputs | str) -> np.ndarray:
    """``op_q(x) - op(x)`` of one call, as ``(elements per channel, channels)`` float64."""
    x = fc.lhs if inputs == CorrectionInputs.FLOAT else qc.lhs
    y = fc.output if inputs == CorrectionInputs.FLOAT else fc.rerun(lhs=x)
    d = np.asarray(qc.rerun(lhs=x), np.float64) - np.asarray(y, np.float64)
    return d.reshape(-1, d.shape[-1])


def _correct_bias(layer: Any, path: str, delta: np.ndarray, create_bias: bool) -> bool:
    """:math:`b \\leftarrow b - \\delta` (computed in float64); ``False`` if the layer kept no bias."""
    if layer.bias is None:
        if not create_bias:
            logger.info("layer %r has no bias and create_bias=False: left uncorrected", path)
            return False
        layer.bias = nnx.Param(jnp.asarray(-delta, layer.param_dtype))
        layer.use_bias = True
        return True
    b = layer.bias[...]
    layer.bias.set_value(jnp.asarray(np.asarray(b, np.float64) - delta, b.dtype))
    return True


__all__ = [
    "FoldedBatchNorm",
    "bias_correction",
    "fold_batchnorm",
    "fold_batchnorm_params",
    "mean_output_error",
]
