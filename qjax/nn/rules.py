"""Rules: which layers of a model get which quantizers.

A rule's ``path`` is a regular expression matched (``re.fullmatch``) against a layer's path in the
module graph, written with ``/`` between attribute names and list indices (``"blocks/0/attn/query"``).
The first rule that matches a layer applies to it; a rule with neither ``weights`` nor
``activations`` keeps the layers it matches in float (an exclusion).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qjax.kernels.dispatch import KERNEL_PATHS, KernelPath
from qjax.nn.integer_qat import Residuals
from qjax.nn.quantized_backward import GradientGranularity, GradientSpec
from qjax.numerics.fields import SpecError, SpecTypeError, did_you_mean, parse_enum, reject_unknown_fields
from qjax.numerics.formats import CodebookFormat, FloatFormat, IntFormat
from qjax.numerics.rounding import needs_key
from qjax.numerics.spec import Granularity, QuantSpec
from qjax.ste import Estimator, parse_estimator


class ActivationScale(enum.StrEnum):
    DYNAMIC = "dynamic"  # from each batch (per-tensor or per-token) at run time
    STATIC = "static"  # from calibration statistics, fixed afterwards


class RuleKind(enum.StrEnum):
    """What a rule's ``path`` selects."""

    LAYER = "layer"  # Linear, LinearGeneral, Conv, ConvTranspose, Einsum and Embed layers
    ATTENTION = "attention"  # the QK^T and PV contractions of attention layers (an attention_fn)


class Observer(enum.StrEnum):
    """How calibration statistics become a static range."""

    MINMAX = "minmax"  # the running min / max over all calibration batches
    MOVING_AVERAGE = "moving_average"  # exponential moving average of per-batch min / max
    HISTOGRAM = "histogram"  # a histogram of |x|: percentile or MSE range (spec.calibration)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Quantizers for the layers whose path matches ``path``.

    A bad field raises :class:`~qjax.numerics.fields.SpecError` (a ``ValueError``) or
    :class:`~qjax.numerics.fields.SpecTypeError` (a ``TypeError``) whose ``field`` names it.

    Attributes:
      path: regular expression for the layer paths this rule covers (full match).
      kind: ``layer`` (the rule covers Linear, LinearGeneral, Conv, ConvTranspose, Einsum and
        Embed layers) or ``attention`` (the :math:`QK^T` and :math:`PV` contractions of the
        attention layers it matches: ``nnx.MultiHeadAttention`` and any module with an
        ``attention_fn``, such as :class:`qjax.models.llama.Attention`; quantized with
        ``activations``, dynamic scales, nearest rounding, ``ste`` or ``clipped_ste``; see
        :mod:`qjax.nn.attention`). The kinds never match each other's layers.
      weights: the spec of the layer's kernel (``None``: kernel stays float).
      activations: the spec of the layer's input (``None``: weight-only).
      weight_estimator: gradient of the weight quantizer in QAT (``ste``, ``clipped_ste``,
        ``lsq``), or ``kmeans_finetune`` with a ``kmeans<b>`` weight spec: the layer trains the
        centroids of its codebook, cluster indices fixed at ``quantize_model`` (Deep Compression;
        see :func:`qjax.ste.codebook_weight`).
      activation_estimator: gradient of the activation quantizer in QAT (``ste``,
        ``clipped_ste``, ``lsq``, ``pact``, or ``lsq_plus``: learned step size and offset, with an
        asymmetric integer spec). Both also take a registered plug-in's name
        (:func:`qjax.register_estimator`).
      activation_scale: ``dynamic`` (each batch's range, per-tensor or per-token) or ``static``
        (calibrated; needs a ``calibrate`` pass before ``convert``).
      observer: how calibration statistics become a static range.
      ema_decay: decay of the moving average observer.
      histogram_bins: bins of the histogram observer.
      integer_forward: in QAT, compute the contraction of integer activations and kernels with
        stateless estimators (``ste``, ``clipped_ste``) in int8 (int32 accumulation) instead of
        float; the value agrees up to float rounding and gradients are unchanged (Linear and
        Einsum layers; see :mod:`qjax.nn.integer_qat`).
      ste_residuals: with ``integer_forward``, what the backward pass contracts the cotangent
        with: ``quantized`` (``Q(x)``, ``Q(w)``: the exact gradient of the simulated network) or
        ``original`` (the float ``x``, ``w``: cheaper, Qwix's default for forward-only QAT).
      gradients: ``None`` (the backward pass in float), or a
        :class:`~qjax.nn.quantized_backward.GradientSpec` (or its mapping): in QAT, the backward
        contractions dL/dx and dL/dW of the layer run on quantized operands (int8 or fp8, with
        nearest or stochastic rounding of the incoming gradient; Linear, LinearGeneral, Einsum
        and Conv layers, and with ``kind='attention'`` the :math:`QK^T` and :math:`PV`
        contractions; an Embed table is a gather and keeps a float gradient).
      amax_history: ``0``: current scaling (each tensor's own range); :math:`H > 0`: delayed
        scaling (Transformer Engine): the per-tensor scales of the input, the kernel and the
        incoming gradient from the largest absolute value of the last :math:`H` steps (the
        current one at the first step). Needs per-tensor specs, dynamic activation scales and
        ``ste`` / ``clipped_ste``; the gradient's history is updated by
        :func:`qjax.training.make_train_step`.
      kernels: what a served (converted) Linear or Einsum layer runs its contraction on: ``auto``
        (Pallas kernels on GPU and TPU, the XLA integer path on CPU), ``pallas`` (on CPU: the Pallas
        interpreter), ``xla``, ``reference`` (the kernels' pure-jnp references, for debugging) or
        ``mosaic_gpu`` (W8A8 and FP8 on the experimental Hopper kernels,
        :mod:`qjax.kernels.experimental.hopper`); parsed into a :class:`~qjax.kernels.dispatch.KernelPath`;
        contractions no kernel covers run on XLA (see :mod:`qjax.kernels.dispatch`).
    """

    path: str
    kind: RuleKind | str = RuleKind.LAYER
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    weight_estimator: Estimator | str = Estimator.STE
    activation_estimator: Estimator | str = Estimator.STE
    activation_scale: ActivationScale | str = ActivationScale.DYNAMIC
    observer: Observer | str = Observer.MINMAX
    ema_decay: float = 0.9
    histogram_bins: int = 2048
    integer_forward: bool = True
    ste_residuals: Residuals | str = Residuals.QUANTIZED
    gradients: GradientSpec | None = None
    amax_history: int = 0
    kernels: KernelPath | str = KernelPath.AUTO

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if not isinstance(self.path, str):
            raise SpecTypeError(f"Rule path={self.path!r} must be a regular expression string", field="path")
        try:
            re.compile(self.path)
        except re.error as e:
            raise SpecError(
                f"Rule path={self.path!r} is not a valid regular expression ({e}); escape special "
                "characters, e.g. r'blocks/0/attn\\.query' or use '.*' as a wildcard",
                field="path",
            ) from None
        for name in ("weights", "activations"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                set_(name, QuantSpec.from_dict(value))
            elif value is not None and not isinstance(value, QuantSpec):
                raise SpecTypeError(
                    f"Rule {name}={value!r} must be a qjax.QuantSpec, a mapping or None", field=name
                )
        if isinstance(self.gradients, Mapping):
            set_("gradients", GradientSpec.from_dict(self.gradients))
        elif self.gradients is not None and not isinstance(self.gradients, GradientSpec):
            raise SpecTypeError(
                f"Rule gradients={self.gradients!r} must be a qjax.nn.GradientSpec, a mapping or None",
                field="gradients",
            )
        set_("weight_estimator", parse_estimator(self.weight_estimator, "weight_estimator"))
        set_("activation_estimator", parse_estimator(self.activation_estimator, "activation_estimator"))
        set_("activation_scale", parse_enum(ActivationScale, self.activation_scale, "activation_scale"))
        set_("observer", parse_enum(Observer, self.observer, "observer"))
        set_("kind", parse_enum(RuleKind, self.kind, "kind"))
        if self.kind == RuleKind.ATTENTION:
            self._check_attention()
        self._check_estimators()
        self._check_training()
        if self.activation_scale == ActivationScale.STATIC and self.activations is not None:
            g = self.activations.granularity
            if g != Granularity.PER_TENSOR:
                raise SpecError(
                    f"Rule {self.path!r}: static activation scales are per-tensor; got "
                    f"granularity={str(g)!r}. Use activation_scale='dynamic' for per-token scales",
                    field="activation_scale",
                )
        if self.ste_residuals not in (Residuals.QUANTIZED, Residuals.ORIGINAL):
            raise SpecError(
                f"Rule {self.path!r}: ste_residuals={self.ste_residuals!r} must be 'quantized' or 'original'",
                field="ste_residuals",
            )
        set_("ste_residuals", Residuals(self.ste_residuals))
        if self.kernels not in KERNEL_PATHS:
            raise ValueError(
                f"Rule {self.path!r}: kernels={self.kernels!r} must be one of {list(KERNEL_PATHS)}"
            )
        set_("kernels", KernelPath(self.kernels))
        if not 0.0 < self.ema_decay < 1.0:
            raise SpecError(
                f"Rule {self.path!r}: ema_decay={self.ema_decay} must be in (0, 1)", field="ema_decay"
            )
        if self.histogram_bins < 16:
            raise SpecError(
                f"Rule {self.path!r}: histogram_bins={self.histogram_bins} must be >= 16",
                field="histogram_bins",
            )

    def _check_estimators(self) -> None:
        if self.weight_estimator in (Estimator.PACT, Estimator.LSQ_PLUS):
            what = "clip" if self.weight_estimator == Estimator.PACT else "offset"
            raise SpecError(
                f"Rule {self.path!r}: weight_estimator={str(self.weight_estimator)!r} learns an "
                f"activation {what}; use 'lsq' to learn weight scales",
                field="weight_estimator",
            )
        if self.activation_estimator == Estimator.KMEANS_FINETUNE:
            raise SpecError(
                f"Rule {self.path!r}: activation_estimator='kmeans_finetune' trains a weight codebook; "
                "set weight_estimator='kmeans_finetune' (with a kmeans weight spec) instead",
                field="activation_estimator",
            )
        codebook = self.weights is not None and isinstance(self.weights.format, CodebookFormat)
        if self.weight_estimator == Estimator.KMEANS_FINETUNE and not codebook:
            got = "no weight spec" if self.weights is None else f"dtype={self.weights.dtype!r}"
            raise SpecError(
                f"Rule {self.path!r}: weight_estimator='kmeans_finetune' trains the centroids of a "
                f"k-means codebook, but the rule has {got}; use weights={{'dtype': 'kmeans4', "
                "'granularity': 'per_channel', 'axis': -1} (kmeans1..kmeans8, per_tensor or per_channel)",
                field="weight_estimator",
            )
        acts = self.activations
        if acts is None or self.activation_estimator != Estimator.LSQ_PLUS:
            return
        if not isinstance(acts.format, IntFormat) or acts.symmetric:
            raise SpecError(
                f"Rule {self.path!r}: activation_estimator='lsq_plus' learns a step size and an "
                f"offset on an asymmetric integer grid; got dtype={acts.dtype!r}, symmetric="
                f"{acts.symmetric}: use e.g. {{'dtype': 'uint4', 'symmetric': False}}",
                field="activation_estimator",
            )

    def _check_training(self) -> None:
        """``gradients`` and ``amax_history``."""
        if self.gradients is not None and self.is_exclusion:
            raise SpecError(
                f"Rule {self.path!r}: gradients quantize the backward pass of quantized layers; the "
                "rule has neither weights nor activations: add them (e.g. weights={'dtype': "
                "'float8_e4m3fn'}) or use a preset (qjax.nn.training_recipe)",
                field="gradients",
            )
        h = self.amax_history
        if h and self.kind == RuleKind.ATTENTION:
            raise SpecError(
                f"Rule {self.path!r}: attention scales are current (each call's range); remove "
                "amax_history from the kind='attention' rule",
                field="amax_history",
            )
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise SpecError(
                f"Rule {self.path!r}: amax_history={h!r} must be an integer >= 0 (0: current scaling; "
                "e.g. 16: delayed scaling over the last 16 steps)",
                field="amax_history",
            )
        if h == 0:
            return
        fix = "per-tensor scales (granularity 'per_tensor') for delayed scaling, or amax_history=0"
        for name in ("weights", "activations"):
            spec = getattr(self, name)
            if spec is not None and spec.granularity != Granularity.PER_TENSOR:
                raise SpecError(
                    f"Rule {self.path!r}: amax_history={h} needs {fix}; {name} have granularity "
                    f"{str(spec.granularity)!r}",
                    field="amax_history",
                )
        grads = self.gradients
        if grads is not None and grads.granularity != GradientGranularity.PER_TENSOR:
            raise SpecError(
                f"Rule {self.path!r}: amax_history={h} needs {fix}; gradients have granularity "
                f"{str(grads.granularity)!r}",
                field="amax_history",
            )
        if self.activation_scale != ActivationScale.DYNAMIC:
            raise SpecError(
                f"Rule {self.path!r}: amax_history={h} replaces the activation scale; remove "
                "activation_scale='static'",
                field="amax_history",
            )
        for name in ("weight_estimator", "activation_estimator"):
            if getattr(self, name) not in (Estimator.STE, Estimator.CLIPPED_STE):
                raise SpecError(
                    f"Rule {self.path!r}: amax_history={h} sets the scales; {name}="
                    f"{str(getattr(self, name))!r} learns them: use 'ste' or 'clipped_ste'",
                    field="amax_history",
                )

    def _check_attention(self) -> None:
        fix = "e.g. Rule(path='.*attn', kind='attention', activations={'dtype': 'int8'})"
        if self.weights is not None:
            raise SpecError(
                f"Rule {self.path!r}: kind='attention' quantizes the attention contractions, which "
                f"have no weights; remove weights and set activations ({fix})",
                field="weights",
            )
        acts = self.activations
        if acts is None:
            return  # an exclusion
        if not isinstance(acts.format, IntFormat | FloatFormat):
            raise SpecError(
                f"Rule {self.path!r}: attention operands need an integer or fp8 dtype; got {acts.dtype!r}",
                field="activations",
            )
        if acts.granularity not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
            raise SpecError(
                f"Rule {self.path!r}: attention operands take granularity 'per_tensor' or 'per_token'; "
                f"got {str(acts.granularity)!r}",
                field="activations",
            )
        if needs_key(acts.rounding):
            raise SpecError(
                f"Rule {self.path!r}: attention operands are rounded without random numbers; got "
                f"rounding={str(acts.rounding)!r}: use 'nearest'",
                field="activations",
            )
        if self.activation_scale != ActivationScale.DYNAMIC:
            raise SpecError(
                f"Rule {self.path!r}: attention scales are dynamic (each call's range); remove "
                "activation_scale='static'",
                field="activation_scale",
            )
        if self.activation_estimator not in (Estimator.STE, Estimator.CLIPPED_STE):
            raise SpecError(
                f"Rule {self.path!r}: attention operands hold no learned quantizer state; use "
                f"activation_estimator 'ste' or 'clipped_ste', not {str(self.activation_estimator)!r}",
                field="activation_estimator",
            )

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.path, path) is not None

    @property
    def is_exclusion(self) -> bool:
        return self.weights is None and self.activations is None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rule:
        """A rule from a mapping of its fields; an unknown key is named with a suggestion
        (:class:`~qjax.numerics.fields.SpecError` with ``field`` the unknown key)."""
        reject_unknown_fields("Rule", sorted(d), sorted(f.name for f in dataclasses.fields(cls)))
        return cls(**d)


def first_match(rules: Sequence[Rule], path: str, kind: RuleKind = RuleKind.LAYER) -> tuple[int, Rule] | None:
    """The index and rule of ``kind`` that applies to ``path`` (the first that matches), or ``None``."""
    for i, rule in enumerate(rules):
        if rule.kind == kind and rule.matches(path):
            return i, rule
    return None


def training_recipe_fields(name: str, *, block_size: int = 128, amax_history: int = 16) -> dict[str, Any]:
    """The :class:`Rule` fields of the training recipe ``name`` as plain mappings (``weights``,
    ``activations``, ``gradients``, ``amax_history``); see :func:`training_recipe`."""
    e4m3, e5m2 = "float8_e4m3fn", "float8_e5m2"
    per_tensor_fp8 = {
        "weights": {"dtype": e4m3},
        "activations": {"dtype": e4m3},
        "gradients": {"dtype": e5m2, "residual_dtype": e4m3},
    }
    int8 = {
        "weights": {"dtype": "int8", "granularity": "per_channel", "axis": -1},
        "activations": {"dtype": "int8", "granularity": "per_token"},
    }
    recipes: dict[str, dict[str, Any]] = {
        "fp8_current": per_tensor_fp8,
        "fp8_delayed": {**per_tensor_fp8, "amax_history": amax_history},
        "fp8_blockwise": {
            "weights": {"dtype": e4m3, "granularity": "per_block", "block_shape": (block_size, block_size)},
            "activations": {"dtype": e4m3, "granularity": "per_group", "axis": -1, "group_size": block_size},
            "gradients": {"dtype": e4m3, "granularity": "per_block", "block_size": block_size},
        },
        "int8": {**int8, "gradients": {"dtype": "int8", "granularity": "per_channel"}},
        "int8_stochastic": {
            **int8,
            "gradients": {"dtype": "int8", "granularity": "per_channel", "rounding": "stochastic"},
        },
    }
    if name not in recipes:
        raise SpecError(
            f"training recipe {name!r} is unknown (known: {', '.join(recipes)})"
            f"{did_you_mean(name, list(recipes))}",
            field="recipe",
        )
    return {"amax_history": 0, **recipes[name]}


TRAINING_RECIPES: tuple[str, ...] = ("fp8_current", "fp8_delayed", "fp8_blockwise", "int8", "int8_stochastic")


def training_recipe(name: str, path: str = ".*", *, block_size: int = 128, amax_history: int = 16) -> Rule:
    """A :class:`Rule` quantizing all three contractions of the layers matching ``path`` by a
    named recipe:

    * ``fp8_current``: e4m3 input and kernel, e5m2 incoming gradient (the saved operands e4m3 in
      the backward contractions), per-tensor current scaling (Transformer Engine);
    * ``fp8_delayed``: the same with delayed scaling over ``amax_history`` steps;
    * ``fp8_blockwise``: e4m3 everywhere, inputs and gradients in 1 x ``block_size`` tiles along
      the contraction, kernels in ``block_size`` x ``block_size`` blocks (DeepSeek-V3);
    * ``int8``, ``int8_stochastic``: int8 per-output-channel kernels, per-token inputs, the
      gradient per row of each backward contraction, rounded to nearest or stochastically.
    """
    fields = training_recipe_fields(name, block_size=block_size, amax_history=amax_history)
    return Rule(path=path, **fields)
