"""Mixed precision by sensitivity: a per-layer scan, then the bit allocation that meets a budget.

**Scan.** For every quantizable layer :math:`l` and candidate width :math:`b`, the model is quantized
with that layer alone at :math:`b` bits (the template's spec with its width replaced, all other
layers in float), calibrated if asked, and evaluated:

.. math::

    \\Delta_{l,b} = m(\\text{float}) - m(Q_{l,b}) \\quad (\\text{higher is better}), \\qquad
    \\Delta_{l,b} = m(Q_{l,b}) - m(\\text{float}) \\quad (\\text{lower is better, e.g. a loss}).

**Allocation.** With :math:`n_l` the weight count of layer :math:`l` (its kernel or embedding; biases
stay float and are not counted), choose one :math:`b_l` per layer:

.. math::

    \\min_{b_1..b_L} \\sum_l \\Delta_{l,b_l} \\quad \\text{s.t.} \\quad
    \\frac{\\sum_l n_l b_l}{\\sum_l n_l} \\le B .

The objective is the standard *additive* approximation: the loss of the mixed model is estimated
by the sum of the single-layer losses, ignoring interactions between layers (as in HAWQ-V3, Yao et
al. 2021, and ZeroQ, Cai et al. 2020). The problem is a multiple-choice knapsack; it is solved
exactly by dynamic programming over the layers on the Pareto frontier of (parameter-bits used,
summed drop) (ZeroQ's Pareto-frontier method, made exact): after layer :math:`l` only the states
that no other state beats in both bits and drop are kept, and states that cannot be completed within
the budget (even with the smallest widths for the remaining layers) are dropped. Time
:math:`O(L \\cdot W \\cdot P \\log(W P))` for :math:`W` widths and a frontier of :math:`P` states,
:math:`P \\le \\min(W^L,\\, C + 1)` with :math:`C` the spare parameter-bits; exact in integers (the
constraint is checked as :math:`\\sum_l n_l b_l \\le \\lfloor B \\sum_l n_l \\rfloor`, with
:math:`B` read as the decimal it prints as).

.. code-block:: python

    template = qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
    table = sensitivity_scan(model, evaluate, bits=(2, 3, 4, 8), template=template)
    allocation = allocate_bits(table, budget=4.0)
    qmodel = qjax.nn.quantize_model(model, rules(allocation, template))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypedDict, TypeVar

import flax.nnx as nnx

from qjax.nn import ActivationScale, Rule, calibrate, quantizable_layers, quantize_model
from qjax.numerics import QuantSpec

logger = logging.getLogger("qjax")

M = TypeVar("M", bound=nnx.Module)

_WIDTH_DTYPE = re.compile(r"(u?int|kmeans)(\d+)")


class SensitivityRow(TypedDict):
    """One row of the sensitivity table: ``path`` quantized alone at ``bits``."""

    path: str
    bits: int
    metric: float  # the evaluation metric of the model with this layer alone quantized
    drop: float  # how much worse than the float model (positive = worse)
    params: int  # the layer's weight count n_l (kernel or embedding)


# ---------------------------------------------------------------------------------------------------
# Templates and rules
# ---------------------------------------------------------------------------------------------------


def with_bits(spec: QuantSpec, bits: int) -> QuantSpec:
    """``spec`` with the width of its ``int``, ``uint`` or ``kmeans`` dtype set to ``bits``."""
    match = _WIDTH_DTYPE.fullmatch(spec.dtype)
    if match is None:
        raise ValueError(
            f"template dtype={spec.dtype!r} has no bit width to vary; use an int<b>, uint<b> or "
            "kmeans<b> dtype (e.g. 'int4') as the template"
        )
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits={bits!r} must be an int, e.g. 4")
    return dataclasses.replace(spec, dtype=f"{match.group(1)}{bits}")


def _template_rule(template: Rule | QuantSpec) -> Rule:
    if isinstance(template, QuantSpec):
        return Rule(path=".*", weights=template)
    if not isinstance(template, Rule):
        raise TypeError(f"template={template!r} must be a qjax.QuantSpec (weights) or a qjax.nn.Rule")
    if template.weights is None:
        raise ValueError(
            f"template rule {template.path!r} has no weights spec; mixed precision varies the "
            "weight width: set weights=qjax.QuantSpec(dtype='int4', ...)"
        )
    return template


def rules(allocation: Allocation | Mapping[str, int], template: Rule | QuantSpec) -> list[Rule]:
    """One rule per allocated layer: the template (a weight spec, or a whole rule whose activation
    spec and estimators are kept) with the layer's width, matching exactly that layer's path.
    Layers absent from ``allocation`` match no rule and stay in float."""
    bits = allocation.bits if isinstance(allocation, Allocation) else allocation
    base = _template_rule(template)
    assert base.weights is not None
    return [
        dataclasses.replace(base, path=re.escape(path), weights=with_bits(base.weights, b))
        for path, b in bits.items()
    ]


# ---------------------------------------------------------------------------------------------------
# Sensitivity scan (model integration)
# ---------------------------------------------------------------------------------------------------


def _weight_count(layer: nnx.Module) -> int:
    name = "embedding" if isinstance(layer, nnx.Embed) else "kernel"
    return int(getattr(layer, name)[...].size)


def _scan_layers(model: nnx.Module, layers: Sequence[str] | None) -> list[tuple[str, int]]:
    found = [(path, _weight_count(layer)) for path, layer in quantizable_layers(model)]
    if not found:
        raise ValueError("the model has no quantizable layer (nnx.Linear, Conv, Einsum or Embed)")
    if layers is None:
        return found
    known = dict(found)
    for path in layers:
        if path not in known:
            raise ValueError(f"layers contains {path!r}, not a quantizable layer; use one of {sorted(known)}")
    return [(path, known[path]) for path in layers]


def sensitivity_scan(
    model: M,
    evaluate: Callable[[M], float],
    *,
    template: Rule | QuantSpec,
    bits: Sequence[int] = (2, 3, 4, 8),
    lower_is_better: bool = False,
    calibration_batches: Iterable[Any] | None = None,
    forward: Callable[[M, Any], Any] | None = None,
    layers: Sequence[str] | None = None,
) -> list[SensitivityRow]:
    """The metric drop when each layer alone is quantized at each width (module docstring).

    Args:
      model: the float NNX model (left unchanged).
      evaluate: ``evaluate(model) -> float`` on the evaluation batches (accuracy, loss, ...).
      template: a weight :class:`QuantSpec`, or a :class:`Rule` whose ``weights`` is the template
        (its activation spec, scale mode and estimators are kept; its path is ignored).
      bits: the candidate widths.
      lower_is_better: the metric is a loss (drop = increase) rather than a score (drop = decrease).
      calibration_batches: if given, each single-layer model is calibrated on them
        (:func:`qjax.nn.calibrate`); required when the template has static activation scales.
      forward: ``forward(model, batch)`` for calibration (default ``model(batch)``).
      layers: the layer paths to scan (default: every quantizable layer, in graph order).

    Returns:
      One :class:`SensitivityRow` per (layer, width), layer-major; ``drop > 0`` means worse.
    """
    base = _template_rule(template)
    widths = [int(b) for b in bits]
    if not widths:
        raise ValueError("bits is empty; pass candidate widths such as (2, 3, 4, 8)")
    assert base.weights is not None
    for b in widths:
        with_bits(base.weights, b)  # an invalid width fails here, before any evaluation
    batches = None if calibration_batches is None else list(calibration_batches)
    static = base.activations is not None and base.activation_scale == ActivationScale.STATIC
    if static and not batches:
        raise ValueError(
            "the template has static activation scales, which need calibration: pass "
            "calibration_batches=[batch, ...] (or use activation_scale='dynamic')"
        )
    reference = float(evaluate(model))
    table: list[SensitivityRow] = []
    for path, n in _scan_layers(model, layers):
        for b in widths:
            qmodel = quantize_model(model, rules({path: b}, base))
            if batches:
                qmodel = calibrate(qmodel, batches, forward)
            metric = float(evaluate(qmodel))
            drop = metric - reference if lower_is_better else reference - metric
            logger.info("sensitivity %s @ %d bits: metric %.6g, drop %.6g", path, b, metric, drop)
            table.append(SensitivityRow(path=path, bits=b, metric=metric, drop=drop, params=n))
    return table


def ranking(table: Sequence[SensitivityRow], bits: int) -> list[str]:
    """Layer paths by decreasing drop at ``bits`` (most sensitive first)."""
    rows = [r for r in table if r["bits"] == bits]
    if not rows:
        raise ValueError(f"bits={bits} is not in the table; it has {sorted({r['bits'] for r in table})}")
    return [r["path"] for r in sorted(rows, key=lambda r: -r["drop"])]


# ---------------------------------------------------------------------------------------------------
# Bit allocation (pure)
# ---------------------------------------------------------------------------------------------------


def solve_allocation(
    costs: Sequence[Sequence[float]], resources: Sequence[Sequence[int]], capacity: int
) -> list[int]:
    """Exact multiple-choice knapsack: one choice :math:`j_l` per group minimising
    :math:`\\sum_l c_{l,j_l}` subject to :math:`\\sum_l r_{l,j_l} \\le` ``capacity``.

    Dynamic programming over the groups on the Pareto frontier of (resource, cost); among optimal
    choices the one using the least resource is returned. ``+inf`` costs are allowed (a choice to
    avoid); NaN is refused. Raises ``ValueError`` if even the cheapest choices exceed ``capacity``.
    """
    if len(costs) != len(resources) or not costs:
        raise ValueError(f"costs ({len(costs)} groups) and resources ({len(resources)}) must match, >= 1")
    for g, (c, r) in enumerate(zip(costs, resources, strict=True)):
        if len(c) != len(r) or not c:
            raise ValueError(f"group {g}: {len(c)} costs and {len(r)} resources; need equal, >= 1")
        if any(math.isnan(x) or x == -math.inf for x in c):
            raise ValueError(f"group {g}: costs {list(c)} must be finite or +inf")
        if any(x < 0 for x in r):
            raise ValueError(f"group {g}: resources {list(r)} must be >= 0")
    # rest[g]: the least resource groups g, g+1, ... can use
    rest = [0] * (len(costs) + 1)
    for g in range(len(costs) - 1, -1, -1):
        rest[g] = rest[g + 1] + min(resources[g])
    if rest[0] > capacity:
        raise ValueError(f"the cheapest choices use {rest[0]} > capacity {capacity}")
    frontier: list[tuple[int, float]] = [(0, 0.0)]
    history: list[list[tuple[int, float, int, int]]] = []  # per group: (resource, cost, parent, choice)
    for g, (c, r) in enumerate(zip(costs, resources, strict=True)):
        candidates = [
            (used + rj, cost + cj, parent, j)
            for parent, (used, cost) in enumerate(frontier)
            for j, (cj, rj) in enumerate(zip(c, r, strict=True))
            if used + rj + rest[g + 1] <= capacity
        ]
        candidates.sort(key=lambda t: (t[0], t[1]))
        kept: list[tuple[int, float, int, int]] = []
        for cand in candidates:  # keep a state only if it has a strictly lower cost than all cheaper ones
            if not kept or cand[1] < kept[-1][1]:
                kept.append(cand)
        history.append(kept)
        frontier = [(used, cost) for used, cost, _, _ in kept]
    choice, state = [0] * len(costs), len(frontier) - 1  # the last frontier state has the least cost
    for g in range(len(costs) - 1, -1, -1):
        _, _, parent, j = history[g][state]
        choice[g], state = j, parent
    return choice


@dataclasses.dataclass(frozen=True, kw_only=True)
class Allocation:
    """A width per layer meeting an average-bits budget.

    Attributes:
      bits: layer path -> width, in table order.
      params: layer path -> weight count :math:`n_l`.
      budget: the average-bits budget :math:`B`.
      average_bits: :math:`\\sum_l n_l b_l / \\sum_l n_l` (``<= budget``).
      predicted_drop: :math:`\\sum_l \\Delta_{l,b_l}`, the additive estimate of the mixed model's drop.
    """

    bits: dict[str, int]
    params: dict[str, int]
    budget: float
    average_bits: float
    predicted_drop: float


def _table_by_layer(table: Sequence[SensitivityRow]) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    drops: dict[str, dict[int, float]] = {}
    params: dict[str, int] = {}
    for row in table:
        path, b, n = row["path"], int(row["bits"]), int(row["params"])
        if b < 1:
            raise ValueError(f"table row {path!r}: bits={b} must be >= 1")
        if n < 1:
            raise ValueError(f"table row {path!r}: params={n} must be >= 1")
        if params.setdefault(path, n) != n:
            raise ValueError(f"layer {path!r} has params {params[path]} and {n} in different rows")
        if b in drops.setdefault(path, {}):
            raise ValueError(f"layer {path!r} has two rows for bits={b}")
        drops[path][b] = float(row["drop"])
    if not drops:
        raise ValueError("the sensitivity table is empty; run sensitivity_scan first")
    return drops, params


def allocate_bits(table: Sequence[SensitivityRow], budget: float) -> Allocation:
    """The widths minimising the summed drop with :math:`\\sum_l n_l b_l / \\sum_l n_l \\le`
    ``budget`` (module docstring), from a :func:`sensitivity_scan` table (only ``path``, ``bits``,
    ``drop`` and ``params`` are read; each layer may have its own candidate widths)."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget):
        raise ValueError(f"budget={budget!r} must be a finite number of bits per weight, e.g. 4.0")
    drops, params = _table_by_layer(table)
    paths = list(drops)
    widths = [sorted(drops[p]) for p in paths]
    total = sum(params.values())
    capacity = math.floor(Fraction(str(float(budget))) * total)
    least = sum(params[p] * w[0] for p, w in zip(paths, widths, strict=True))
    if least > capacity:
        raise ValueError(
            f"budget={budget} bits per weight is infeasible: the smallest widths already average "
            f"{least / total:.4g} bits (smallest candidate {min(w[0] for w in widths)}); raise the budget "
            "to at least that or scan smaller widths"
        )
    costs = [[drops[p][b] for b in w] for p, w in zip(paths, widths, strict=True)]
    resources = [[params[p] * b for b in w] for p, w in zip(paths, widths, strict=True)]
    choice = solve_allocation(costs, resources, capacity)
    bits = {p: w[j] for p, w, j in zip(paths, widths, choice, strict=True)}
    return Allocation(
        bits=bits,
        params=dict(params),
        budget=float(budget),
        average_bits=sum(params[p] * b for p, b in bits.items()) / total,
        predicted_drop=sum(drops[p][b] for p, b in bits.items()),
    )


__all__ = [
    "Allocation",
    "SensitivityRow",
    "allocate_bits",
    "ranking",
    "rules",
    "sensitivity_scan",
    "solve_allocation",
    "with_bits",
]
