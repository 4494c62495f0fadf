"""Flax NNX integration: rule-based model quantization, QAT / calibrate / serve modes."""

from qjax.nn.linen import FakeQuantDotGeneral
from qjax.nn.model import (
    QuantizedWeight,
    UnusedRuleWarning,
    calibrate,
    convert,
    learned_quantizer_params,
    quantizable_layers,
    quantize_model,
    quantized_ops,
    set_mode,
    summary,
)
from qjax.nn.ops import QuantizedEmbedding, QuantizedOp
from qjax.nn.rules import ActivationScale, Observer, Rule
from qjax.nn.stats import QuantStats, StaticQParams

__all__ = [
    "ActivationScale",
    "FakeQuantDotGeneral",
    "Observer",
    "QuantStats",
    "QuantizedEmbedding",
    "QuantizedOp",
    "QuantizedWeight",
    "Rule",
    "StaticQParams",
    "UnusedRuleWarning",
    "calibrate",
    "convert",
    "learned_quantizer_params",
    "quantizable_layers",
    "quantize_model",
    "quantized_ops",
    "set_mode",
    "summary",
]
