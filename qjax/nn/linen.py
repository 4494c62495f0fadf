"""A quantized ``dot_general`` for Flax Linen layers (``nn.Dense(dot_general=...)``).

Linen layers hold no quantizer state, so this is fake quantization with dynamic (per-batch)
scales and the stateless estimators (``ste``, ``clipped_ste``); learned scales, calibration and
serving are the NNX path's (:func:`qjax.nn.quantize_model`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from qjax.numerics import QuantSpec
from qjax.numerics.fields import SpecError, parse_enum
from qjax.ste import Estimator, fake_quant


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
