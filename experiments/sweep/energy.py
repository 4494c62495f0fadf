"""Model size and energy per forward pass of a (possibly quantized) NNX model.

These are the ``model`` fields of a results record (``bits_per_weight``, ``size_bytes``,
``energy_pj``). They describe the model the quantization rules *deploy*, whatever mode the model is
in: a ``qat`` or calibrated model is charged as if converted.

**Storage** (:func:`model_storage`): every variable that serving needs, at its real size.

* Float variables (``nnx.Param``, ``nnx.BatchStat``, static activation parameters, learned activation
  scales / clips): ``size * itemsize`` of their dtype.
* Converted kernels (:class:`qjax.nn.QuantizedWeight`): ``QArray.nbytes``: packed values (int4 two
  per byte, int2 four per byte, padded to whole bytes), scales, zero points, codebooks.
* Kernels of quantized layers that are not converted yet: the ``nbytes`` of the ``QArray``
  :func:`qjax.nn.ops.quantize_kernel` would store, computed from shapes only (``jax.eval_shape``).
* Excluded: calibration statistics (:class:`qjax.nn.QuantStats`), RNG state, and a learned LSQ
  weight scale (``weight_scale``), which the stored kernel's scale already holds.

``bits_per_weight`` :math:`= 8 \\sum_k \\mathrm{bytes}_k / \\sum_k \\mathrm{elements}_k` over the kernels
(``kernel`` / ``embedding``) of every Linear, Conv, Einsum and Embed, quantized or not (a float32
kernel counts 32 bits per element; scales and zero points are included). ``size_bytes`` is the sum
over all counted variables.

**Energy** (:func:`forward_energy`), with the 45 nm figures of Horowitz (2014), ANCHORS.md:

.. math::

    E = \\sum_{\\ell} \\mathrm{MACs}_\\ell \\, e_\\ell
        + 20\\,\\mathrm{pJ/bit} \\times 8 \\times \\mathrm{size\\_bytes},

per forward pass of **one example**: MACs are counted on the given batch and divided by its batch
size (the leading axis of its first array).

* MACs of a layer are counted from the operand shapes of each call of its contraction hook during
  one forward, traced with ``jax.eval_shape`` on a working copy (:func:`record_contractions`; the
  model is not changed, nothing is computed), as the size of the iteration space: dot_general and
  einsum: output elements times the product of the contracted extents; convolution: output elements
  times the kernel's elements per output channel (spatial extent times input channels per group;
  padding positions count, as in the usual convention). Calls of a shared layer add up.
* Energy per MAC :math:`e_\\ell`, by what the deployed layer computes:

  - float32 (float layers, weight-only rules, activation-only rules, k-means codebooks, which decode
    to float): fp32 multiply 3.7 pJ + fp32 add 0.9 pJ = 4.6 pJ; float layers with 16-bit float
    operands: the fp16 figures below;
  - integer weights (:math:`b_w` bits) and integer activations (:math:`b_a` bits): the 8-bit
    multiply 0.2 pJ scaled by :math:`b_w b_a / 64` (multiplier energy grows with the product of the
    operand widths: the design notes' "quadratic in bit width") plus a 32-bit add 0.1 pJ (int32
    accumulation): W8A8 0.3 pJ, W4A8 0.2 pJ, W2A8 0.15 pJ;
  - low-precision float operands (fp8, fp4, MX, NVFP4) on either side of a layer whose both operands
    are quantized: the fp16 figures, multiply 1.1 pJ + add 0.4 pJ = 1.5 pJ. Horowitz lists no fp8
    figure; fp16 is the nearest listed, so these layers are *over*-charged.

* Memory: every stored bit (``size_bytes`` of :func:`model_storage`, scales included) is read once
  from DRAM per forward pass, at 640 pJ per 32-bit read = 20 pJ/bit (batch-1 inference with no
  on-chip reuse; SRAM traffic for activations is not counted).
* Not counted: bias additions, normalisation, activation functions, pooling, softmax, the scaling
  and rounding of activation quantizers, embedding lookups, and contractions that do not go
  through a Linear / Conv / Einsum hook (e.g. attention scores computed with ``jnp.einsum`` in model
  code, ``nnx.Embed.attend``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from qjax.nn import OpKind, QuantStats, layer_hook, quantizable_layers, quantized_ops
from qjax.nn.ops import QuantizedContraction, QuantizedEmbedding, quantize_kernel
from qjax.numerics import QArray
from qjax.numerics.formats import BlockFloatFormat, FloatFormat, IntFormat

# Horowitz 2014, 45 nm, pJ (ANCHORS.md).
FP32_MULT_PJ, FP32_ADD_PJ = 3.7, 0.9
FP16_MULT_PJ, FP16_ADD_PJ = 1.1, 0.4
INT8_MULT_PJ, INT32_ADD_PJ = 0.2, 0.1
DRAM_PJ_PER_32_BITS = 640.0
DRAM_PJ_PER_BIT = DRAM_PJ_PER_32_BITS / 32

Forward = Callable[[nnx.Module, Any], Any]

_KERNEL_NAMES = {nnx.Linear: "kernel", nnx.Conv: "kernel", nnx.Einsum: "kernel", nnx.Embed: "embedding"}


def _kernel_name(layer: nnx.Module) -> str:
    for t, name in _KERNEL_NAMES.items():
        if isinstance(layer, t):
            return name
    raise TypeError(f"{type(layer).__name__} is not a Linear, Conv, Einsum or Embed")


def _leaf_bytes(value: Any) -> int:
    """Bytes of every array leaf of ``value`` (arrays, ``QArray``, tuples, ``ShapeDtypeStruct``)."""
    return int(sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(value)))


def _would_store(op: QuantizedContraction | QuantizedEmbedding, kernel: jax.Array) -> Any:
    """The abstract ``QArray`` (shapes and dtypes only) that converting ``op``'s layer would store."""
    return jax.eval_shape(lambda k: quantize_kernel(op, k), kernel)


def model_storage(model: nnx.Module) -> dict[str, Any]:
    """Real storage of ``model`` (see the module docstring).

    Returns:
      ``size_bytes`` (int), ``bits_per_weight`` (float), ``kernel_bytes`` and ``kernel_elements``
      (the kernels that ``bits_per_weight`` is over) and ``params``: one dict per counted variable
      with ``path``, ``type`` (the variable class), ``dtype`` (the stored format for quantized
      kernels), ``elements`` (logical), ``bytes`` and ``kernel`` (bool).
    """
    ops = {id(layer): op for _, layer, op in quantized_ops(model)}
    kernels: dict[int, nnx.Module] = {}
    for _, layer in quantizable_layers(model):
        kernels[id(getattr(layer, _kernel_name(layer)))] = layer
    # learned scales and k-means codebooks/indices are part of the QArray a kernel would store
    skip = {
        id(v)
        for op in ops.values()
        for v in (
            op.weight_scale,
            getattr(op, "weight_static", None),  # a pinned grid (AdaRound, GPTQ, AWQ): the QArray's scales
            getattr(op, "centroids", None),
            getattr(op, "indices", None),
        )
        if v is not None
    }
    params: list[dict[str, Any]] = []
    for parts, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable) or isinstance(var, QuantStats | nnx.RngState):
            continue
        if id(var) in skip:
            continue
        value = var.get_value()
        if not jax.tree_util.tree_leaves(value):  # e.g. static scales before calibration
            continue
        owner = kernels.get(id(var))
        op = ops.get(id(owner)) if owner is not None else None
        dtype = None
        if op is not None and op.rule.weights is not None and not isinstance(value, QArray):
            value = _would_store(op, value)
        if isinstance(value, QArray):
            dtype, elements = value.spec.dtype, math.prod(value.shape)
        else:
            leaves = jax.tree_util.tree_leaves(value)
            elements = int(sum(math.prod(leaf.shape) for leaf in leaves))
            dtype = str(leaves[0].dtype) if len(leaves) == 1 else None
        params.append(
            {
                "path": "/".join(str(p) for p in parts),
                "type": type(var).__name__,
                "dtype": dtype,
                "elements": elements,
                "bytes": _leaf_bytes(value),
                "kernel": owner is not None,
            }
        )
    kernel_rows = [p for p in params if p["kernel"]]
    if not kernel_rows:
        raise ValueError("the model has no Linear, Conv, Einsum or Embed kernel to measure")
    kernel_bytes = sum(p["bytes"] for p in kernel_rows)
    kernel_elements = sum(p["elements"] for p in kernel_rows)
    return {
        "size_bytes": sum(p["bytes"] for p in params),
        "bits_per_weight": 8.0 * kernel_bytes / kernel_elements,
        "kernel_bytes": kernel_bytes,
        "kernel_elements": kernel_elements,
        "params": params,
    }


# -- MACs ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Contraction:
    """One call of a layer's contraction: operand shapes and the static arguments that define it.

    ``numbers``: ``dot_general`` dimension numbers, ``conv`` ``ConvDimensionNumbers`` (or ``None``:
    ``HWIO`` kernel) or the ``einsum`` equation.
    """

    kind: OpKind
    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    numbers: Any
    lhs_itemsize: int = 4

    @property
    def macs(self) -> int:
        """Output elements times the products that make each one (see the module docstring)."""
        out_size = math.prod(self.out_shape)
        if self.kind == OpKind.EINSUM:
            return einsum_macs(self.numbers, self.lhs_shape, self.rhs_shape, out_size)
        if self.kind == OpKind.DOT_GENERAL:
            (_, rhs_contract), _ = self.numbers
            return out_size * math.prod(self.rhs_shape[a] for a in rhs_contract)
        out_axis = len(self.rhs_shape) - 1 if self.numbers is None else int(self.numbers.rhs_spec[0])
        return out_size * math.prod(self.rhs_shape) // self.rhs_shape[out_axis]


def _einsum_labels(spec: str, shape: Sequence[int]) -> dict[str, int]:
    """Label -> extent of one einsum operand (``...`` allowed)."""
    head, dots, tail = spec.partition("...")
    if not dots:
        head, tail = spec, ""
    sizes = dict(zip(head, shape[: len(head)], strict=True))
    sizes.update(zip(tail, shape[len(shape) - len(tail) :] if tail else (), strict=True))
    return sizes


def einsum_macs(equation: str, lhs_shape: Sequence[int], rhs_shape: Sequence[int], out_size: int) -> int:
    """Multiply-accumulates of a two-operand einsum: output elements times contracted extents."""
    eq = equation.replace(" ", "")
    inputs, arrow, out = eq.partition("->")
    lhs, rhs = inputs.split(",")
    sizes = _einsum_labels(lhs, lhs_shape) | _einsum_labels(rhs, rhs_shape)
    letters = (lhs + rhs).replace(".", "")
    if not arrow:  # implicit output: the labels that appear once
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    contracted = {c for c in letters if c not in out}
    return out_size * math.prod(sizes[c] for c in contracted)


FLOAT_OPS: dict[OpKind, Callable[..., Any]] = {  # the float contraction of each hook kind
    OpKind.DOT_GENERAL: jax.lax.dot_general,
    OpKind.CONV: jax.lax.conv_general_dilated,
    OpKind.EINSUM: jnp.einsum,
}


class _ShapeRecorder:
    """A contraction hook that records each call's :class:`Contraction` (works under tracing)."""

    def __init__(self, inner: Callable[..., Any], kind: OpKind, log: list[Contraction]):
        self.inner, self.kind, self.log = inner, kind, log

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        if self.kind == OpKind.EINSUM:
            numbers, lhs, rhs = args[0], args[1], args[2]
        else:
            lhs, rhs = args[0], args[1]
            key = "dimension_numbers"
            numbers = args[2] if self.kind == OpKind.DOT_GENERAL and len(args) > 2 else kwargs.get(key)
        shape = lambda a: tuple(int(n) for n in a.shape)
        self.log.append(
            Contraction(self.kind, shape(lhs), shape(rhs), shape(out), numbers, lhs.dtype.itemsize)
        )
        return out


def record_contractions(
    model: nnx.Module, example_batch: Any, forward: Forward | None = None
) -> dict[str, list[Contraction]]:
    """The contractions of every Linear / Conv / Einsum during one forward, by layer path.

    Shapes only: the forward is traced with ``jax.eval_shape`` (nothing is computed) on a working
    copy in inference mode whose quantized layers are made float again (same shapes: converted
    kernels become float zeros of their logical shape). ``model`` is not changed.
    """
    work = nnx.clone(model)
    work.eval()
    for _, layer, op in quantized_ops(work):
        hook = layer_hook(layer)
        if hook.kind not in FLOAT_OPS or not isinstance(op, QuantizedContraction):
            continue
        setattr(layer, hook.hook, nnx.static(FLOAT_OPS[hook.kind]))
        kernel = layer.kernel.get_value()  # type: ignore[attr-defined]
        if isinstance(kernel, QArray):
            layer.kernel = nnx.Param(jnp.zeros(kernel.shape, jnp.float32))  # type: ignore[attr-defined]
    calls: dict[str, list[Contraction]] = {}
    for path, layer in quantizable_layers(work):
        hook = layer_hook(layer)
        if hook.kind in FLOAT_OPS:
            calls[path] = []
            recorder = _ShapeRecorder(getattr(layer, hook.hook), hook.kind, calls[path])
            setattr(layer, hook.hook, nnx.static(recorder))
    fwd = forward if forward is not None else (lambda m, b: m(b))
    graphdef, state = nnx.split(work)  # traced state: no concrete-value checks, mutations stay inside
    jax.eval_shape(lambda st, b: fwd(nnx.merge(graphdef, st), b), state, example_batch)
    return calls


# -- energy ----------------------------------------------------------------------------------------


def mac_energy(op: QuantizedContraction | None, operand_itemsize: int) -> tuple[str, float]:
    """``(arithmetic, pJ per MAC)`` of a layer (see the module docstring).

    ``op`` is the layer's quantized op (``None`` for a float layer); ``operand_itemsize`` the bytes
    of the float operands the layer is called with.
    """
    w = a = None
    if op is not None:
        w, a = op.rule.weights, op.rule.activations
    if w is not None and a is not None:
        fw, fa = w.format, a.format
        if isinstance(fw, IntFormat) and isinstance(fa, IntFormat):
            mult = INT8_MULT_PJ * fw.bits * fa.bits / 64
            return f"{fw.name} x {fa.name}", mult + INT32_ADD_PJ
        low_float = FloatFormat | BlockFloatFormat
        if all(isinstance(f, IntFormat | low_float) for f in (fw, fa)):
            return f"{fw.name} x {fa.name} (fp16 figures)", FP16_MULT_PJ + FP16_ADD_PJ
    if operand_itemsize <= 2:
        return "float16", FP16_MULT_PJ + FP16_ADD_PJ
    return "float32", FP32_MULT_PJ + FP32_ADD_PJ


def _batch_size(batch: Any) -> int:
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(batch) if np.ndim(leaf) > 0]
    if not leaves:
        raise ValueError("example_batch has no array with a batch axis; pass e.g. x[:1]")
    return int(np.shape(leaves[0])[0])


def forward_energy(
    model: nnx.Module,
    example_batch: Any,
    *,
    forward: Forward | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Energy of one forward pass of one example, in pJ (see the module docstring).

    Args:
      model: float, ``qat``, calibrated or converted; it is not changed.
      example_batch: an input batch; MACs are divided by its ``batch_size``.
      forward: ``forward(model, batch)`` (traced, not run; see :func:`record_contractions`);
        defaults to ``model(batch)``.
      batch_size: examples in ``example_batch`` (default: the leading axis of its first array).

    Returns:
      ``energy_pj`` (= ``compute_pj + memory_pj``), ``compute_pj``, ``memory_pj``, ``macs``,
      ``size_bytes``, and ``layers``: per Linear / Conv / Einsum, ``path``, ``layer``,
      ``arithmetic``, ``macs``, ``pj_per_mac``, ``compute_pj``, ``bytes`` (its stored variables)
      and ``memory_pj``. Per-example MACs are ints when the batch divides them.
    """
    n = _batch_size(example_batch) if batch_size is None else batch_size
    if n < 1:
        raise ValueError(f"batch_size={n} must be >= 1")
    storage = model_storage(model)
    ops = {path: op for path, _, op in quantized_ops(model)}
    calls = record_contractions(model, example_batch, forward)
    layers = []
    for path, layer in quantizable_layers(model):
        if path not in calls:  # Embed: no contraction
            continue
        op = ops.get(path)
        total = sum(call.macs for call in calls[path])
        macs: float = total // n if total % n == 0 else total / n
        itemsize = calls[path][0].lhs_itemsize if calls[path] else 4
        arithmetic, pj = mac_energy(op if isinstance(op, QuantizedContraction) else None, itemsize)
        nbytes = sum(p["bytes"] for p in storage["params"] if p["path"].startswith(path + "/"))
        layers.append(
            {
                "path": path,
                "layer": type(layer).__name__,
                "arithmetic": arithmetic,
                "macs": macs,
                "pj_per_mac": pj,
                "compute_pj": macs * pj,
                "bytes": nbytes,
                "memory_pj": 8 * nbytes * DRAM_PJ_PER_BIT,
            }
        )
    compute = float(sum(row["compute_pj"] for row in layers))
    memory = 8 * storage["size_bytes"] * DRAM_PJ_PER_BIT
    return {
        "energy_pj": compute + memory,
        "compute_pj": compute,
        "memory_pj": memory,
        "macs": sum(row["macs"] for row in layers),
        "size_bytes": storage["size_bytes"],
        "layers": layers,
    }


__all__ = [
    "DRAM_PJ_PER_BIT",
    "Contraction",
    "einsum_macs",
    "forward_energy",
    "mac_energy",
    "model_storage",
    "record_contractions",
]
