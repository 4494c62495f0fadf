"""Flax Linen models: rule-based fake quantization, conversion and integer serving.

Linen layers hold no quantizer state, so quantization here is stateless: dynamic (per-call) scales
and the stateless estimators (``ste``, ``clipped_ste``); learned scales, calibration and static
scales are the NNX path's (:func:`qjax.nn.quantize_model`).

.. code-block:: python

    rules = [Rule(path=".*attn", kind="attention", activations=a8),
             Rule(path=".*", weights=w8, activations=a8)]
    forward = qjax.nn.linen.quantized_apply(model, rules)            # qat: fake quantization
    loss = loss_fn(forward(variables, x))                             # differentiable (STE)
    served = qjax.nn.linen.convert(model, variables, rules, x)        # kernels stored as QArray
    y = qjax.nn.linen.quantized_apply(model, rules, "serve")(served, x)   # int8 contractions

A rule's ``path`` matches a Linen module's path (``"block/attn/query"``, auto-named submodules
included: ``"Dense_0"``). Inside :func:`quantized_apply`, a method interceptor installs qjax's op
as the hook of each matched layer for the duration of its call: ``dot_general`` of ``nn.Dense`` /
``nn.DenseGeneral``, ``conv_general_dilated`` of ``nn.Conv``, ``promote_dtype`` of ``nn.Einsum``
and ``nn.ConvTranspose`` (their contractions are not injectable: served, they run in float on the
dequantized kernel), and ``attention_fn`` of ``nn.MultiHeadDotProductAttention`` for rules of
``kind='attention'`` (its projections are ``DenseGeneral`` layers). The ops are
:class:`~qjax.nn.ops.QuantizedOp` and :class:`~qjax.nn.attention.QuantizedAttention`, the same as
the NNX path's, so values agree between the two.

:class:`FakeQuantDotGeneral` is the older, single-seam form: a ``dot_general`` for one
``nn.Dense(dot_general=...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax.core import freeze, unfreeze

from qjax.nn.attention import QuantizedAttention
from qjax.nn.hooks import OpKind
from qjax.nn.ops import (
    Mode,
    QuantizedEmbedding,
    QuantizedOp,
    promote_keeping_quantized_varargs,
    quantize_kernels,
)
from qjax.nn.rules import ActivationScale, Rule, RuleKind, first_match
from qjax.numerics import QArray, QuantSpec
from qjax.numerics.fields import SpecError, parse_enum
from qjax.numerics.rounding import Rounding
from qjax.ste import Estimator, fake_quant

logger = logging.getLogger("qjax")

# Linen layer type -> (the field qjax installs its op in, the op's kind)
LINEN_HOOKS: dict[type, tuple[str, OpKind]] = {
    nn.Dense: ("dot_general", OpKind.DOT_GENERAL),
    nn.DenseGeneral: ("dot_general", OpKind.DOT_GENERAL),
    nn.Conv: ("conv_general_dilated", OpKind.CONV),
    nn.Einsum: ("promote_dtype", OpKind.CONV_TRANSPOSE),  # operands quantized where they are promoted
    nn.ConvTranspose: ("promote_dtype", OpKind.CONV_TRANSPOSE),
}
_STATELESS = (Estimator.STE, Estimator.CLIPPED_STE)


def _linen_hook(module: nn.Module) -> tuple[str, OpKind] | None:
    for t, hook in LINEN_HOOKS.items():
        if type(module) is t:
            return hook
    return None


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _check_rules(rules: Iterable[Rule | Mapping[str, Any]]) -> list[Rule]:
    if isinstance(rules, Rule | Mapping):
        raise TypeError("rules must be a list of qjax.nn.Rule (or mappings); wrap a single rule in a list")
    out = [r if isinstance(r, Rule) else Rule.from_dict(r) for r in rules]
    for rule in out:
        for field in ("weight_estimator", "activation_estimator"):
            if getattr(rule, field) not in _STATELESS:
                raise SpecError(
                    f"Rule {rule.path!r}: {field}={str(getattr(rule, field))!r} learns quantizer state, "
                    "which Linen layers cannot hold; use 'ste' or 'clipped_ste', or the NNX path "
                    "(qjax.nn.quantize_model)",
                    field=field,
                )
        if rule.activations is not None and rule.activation_scale != ActivationScale.DYNAMIC:
            raise SpecError(
                f"Rule {rule.path!r}: static activation scales need calibration state, which Linen layers "
                "cannot hold; use activation_scale='dynamic', or the NNX path (qjax.nn.calibrate)",
                field="activation_scale",
            )
        if rule.gradients is not None or rule.amax_history:
            raise SpecError(
                f"Rule {rule.path!r}: quantized backward passes and delayed scaling need layer state "
                "Linen layers do not hold; remove gradients and amax_history, or use the NNX path "
                "(qjax.nn.quantize_model)",
                field="gradients" if rule.gradients is not None else "amax_history",
            )
        if any(s is not None and s.rounding == Rounding.STOCHASTIC for s in (rule.weights, rule.activations)):
            raise SpecError(
                f"Rule {rule.path!r}: stochastic rounding needs a key stream, which Linen layers do not "
                "thread; use rounding='nearest', or the NNX path",
                field="weights" if rule.weights is not None else "activations",
            )
    return out


@contextlib.contextmanager
def _intercepted(rules: list[Rule], mode: Mode, seen: dict[str, str] | None = None) -> Iterator[None]:
    """Install qjax's ops in the matched Linen layers for the duration of each of their calls;
    ``seen`` collects ``path -> layer type`` of every hookable layer called."""

    def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = _path(module)
        installed: list[tuple[str, Any]] = []
        hook = _linen_hook(module)
        if hook is not None:
            if seen is not None:
                seen[path] = type(module).__name__
            match = first_match(rules, path)
            if match is not None and not match[1].is_exclusion:
                field, kind = hook
                op = QuantizedOp(kind, path, match[1], None, mode)
                installed.append((field, op if kind != OpKind.CONV_TRANSPOSE else _varargs(op)))
                if mode == Mode.SERVE and field != "promote_dtype" and match[1].weights is not None:
                    installed.append(("promote_dtype", promote_keeping_quantized_varargs))
        elif isinstance(module, nn.MultiHeadDotProductAttention):
            if seen is not None:
                seen[f"{path} (QK^T, PV)"] = type(module).__name__
            match = first_match(rules, path, RuleKind.ATTENTION)
            if match is not None and not match[1].is_exclusion:
                if module.attention_fn is not nn.dot_product_attention:
                    raise ValueError(
                        f"layer {path!r} uses its own attention_fn; a rule of kind='attention' replaces "
                        "flax's nn.dot_product_attention only"
                    )
                installed.append(("attention_fn", QuantizedAttention(path, match[1], mode)))
        old = [(field, getattr(module, field)) for field, _ in installed]
        for field, value in installed:
            object.__setattr__(module, field, value)
        try:
            return next_fun(*args, **kwargs)
        finally:
            for field, value in old:
                object.__setattr__(module, field, value)

    with nn.intercept_methods(interceptor):
        yield


def _varargs(op: QuantizedOp) -> Callable[..., Any]:
    """Linen's ``promote_dtype(*arrays, dtype=..., inexact=...)`` form of ``op.promote``."""
    return lambda *arrays, dtype=None, inexact=True: op.promote(arrays, dtype=dtype, inexact=inexact)


def quantized_apply(
    model: nn.Module, rules: Iterable[Rule | Mapping[str, Any]], mode: Mode | str = Mode.QAT
) -> Callable[..., Any]:
    """``model.apply`` with the ``rules`` applied (module docstring): ``mode='qat'`` fake-quantizes
    (differentiable), ``'serve'`` runs a model converted by :func:`convert` (integer or fp8
    contractions), ``'calibrate'`` runs in float. Takes and returns what ``model.apply`` does."""
    mode = parse_enum(Mode, mode, "mode")
    if mode == Mode.CONVERT:
        raise ValueError("mode='convert' is qjax.nn.linen.convert(model, variables, rules, *example)")
    checked = _check_rules(rules)

    def apply(variables: Any, *args: Any, **kwargs: Any) -> Any:
        with _intercepted(checked, mode):
            return model.apply(variables, *args, **kwargs)

    return apply


def convert(
    model: nn.Module, variables: Mapping[str, Any], rules: Iterable[Rule | Mapping[str, Any]], *example: Any
) -> Any:
    """``variables`` with the kernel of every layer a rule quantizes stored as a ``QArray``, for
    :func:`quantized_apply` in ``serve`` mode. ``example`` is an input the model is traced on
    (``jax.eval_shape``: no compute) to find its layers. Logs a WARNING listing the layers that
    hold parameters and stay float."""
    checked = _check_rules(rules)
    seen: dict[str, str] = {}
    with _intercepted(checked, Mode.CALIBRATE, seen):
        jax.eval_shape(lambda v, *a: model.apply(v, *a), variables, *example)
    params = unfreeze(variables["params"])
    todo: list[tuple[QuantizedOp | QuantizedEmbedding, jax.Array]] = []
    places = []
    for path, kind_name in seen.items():
        if kind_name == "MultiHeadDotProductAttention":
            continue
        match = first_match(checked, path)
        if match is None or match[1].is_exclusion or match[1].weights is None:
            continue
        node = params
        for part in path.split("/"):
            node = node[part]
        kind = LINEN_HOOKS[getattr(nn, kind_name)][1]
        todo.append((QuantizedOp(kind, path, match[1], None, Mode.QAT), node["kernel"]))
        places.append(node)
    for node, q in zip(places, quantize_kernels(todo), strict=True):
        node["kernel"] = q
    _warn_float(seen, checked, params)
    out = dict(variables)
    out["params"] = freeze(params) if not isinstance(variables["params"], dict) else params
    return out


def _warn_float(seen: Mapping[str, str], rules: list[Rule], params: Mapping[str, Any]) -> None:
    left = []
    for path, kind_name in seen.items():
        if kind_name == "MultiHeadDotProductAttention":
            match = first_match(rules, path.removesuffix(" (QK^T, PV)"), RuleKind.ATTENTION)
            why = "no rule of kind='attention' matched"
        else:
            match = first_match(rules, path)
            why = "no rule matched"
        if match is None or match[1].is_exclusion:
            left.append(f"  {path} ({kind_name}): {why if match is None else f'rule {match[0]} excludes it'}")
    quantized = {p for p in seen if not p.endswith(" (QK^T, PV)")}

    def walk(node: Mapping[str, Any], parts: tuple[str, ...]) -> None:
        own = [k for k, v in node.items() if not isinstance(v, Mapping)]
        path = "/".join(parts)
        if own and path not in quantized:
            left.append(f"  {path or '(root)'}: parameters {', '.join(own)} outside the layers qjax hooks")
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, (*parts, k))

    walk(params, ())
    if left:
        logger.warning("%d parameter-holding modules left in float:\n%s", len(left), "\n".join(left))


def served_kernels(variables: Mapping[str, Any]) -> list[str]:
    """Paths of the kernels stored as ``QArray`` in converted ``variables``."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, QArray)
    )[0]:
        if isinstance(leaf, QArray):
            out.append("/".join(str(getattr(k, "key", k)) for k in path))
    return out


@dataclasses.dataclass(frozen=True)
class FakeQuantDotGeneral:
    """``lax.dot_general`` with the lhs (activations) and rhs (kernel) fake-quantized."""

    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    weight_estimator: Estimator | str = Estimator.STE
    activation_estimator: Estimator | str = Estimator.STE

    def __post_init__(self) -> None:
        for name in ("weight_estimator", "activation_estimator"):
            if getattr(self, name) not in (Estimator.STE, Estimator.CLIPPED_STE):
                raise SpecError(
                    f"{name}={getattr(self, name)!r}: Linen layers hold no learned quantizer state; "
                    "use 'ste' or 'clipped_ste', or the NNX path (qjax.nn.quantize_model) for lsq/pact",
                    field=name,
                )
            object.__setattr__(self, name, parse_enum(Estimator, getattr(self, name), name))

    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, *args: Any, **kwargs: Any):
        if self.activations is not None:
            lhs = fake_quant(lhs, self.activations, self.activation_estimator)
        if self.weights is not None:
            rhs = fake_quant(rhs, self.weights, self.weight_estimator)
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)
