"""The plan of one cell: its config's strings and mappings as the typed qjax values the runner uses.

:func:`experiments.sweep.validation.make_plan` builds it while it checks the cell's config (every
``QuantSpec`` and ``Rule`` is built there, once), :class:`experiments.sweep.config.Cell` carries it,
and :mod:`experiments.sweep.runner` passes its values on without reading ``quant`` again.
"""

from __future__ import annotations

import dataclasses

import qjax


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What one cell runs, typed.

    Attributes:
      rules: the ``qjax.nn.Rule`` of each ``quant.overrides`` entry, in order (``keep_float``: an
        exclusion; ``null`` fields inherit from ``quant``), then the ``kind='attention'`` rule of
        ``quant.attention`` when it is set, then the catch-all rule ``'.*'`` with ``quant.weights``
        and ``quant.activations``. Built for every method (``float`` ignores them).
      adaround: the AdaRound settings (``method.adaround_*``) when ``method.rounding`` is
        ``adaround``, else ``None``.
    """

    rules: tuple[qjax.nn.Rule, ...]
    adaround: qjax.methods.AdaRoundConfig | None = None

    @property
    def default_rule(self) -> qjax.nn.Rule:
        """The catch-all rule (the template of mixed precision's per-layer widths)."""
        return self.rules[-1]

    @property
    def attention_rules(self) -> tuple[qjax.nn.Rule, ...]:
        """The rules of ``kind='attention'`` (``quant.attention``)."""
        return tuple(r for r in self.rules if r.kind == qjax.nn.RuleKind.ATTENTION)
