"""Flax NNX integration: rule-based model quantization, QAT / calibrate / serve modes."""

from qjax.nn.diagnostics import (
    HookCall,
    channel_outliers,
    format_table,
    kurtosis,
    layer_diagnostics,
    record_hook_calls,
    sqnr_db,
)
from qjax.nn.fold import (
    FoldedBatchNorm,
    bias_correction,
    fold_batchnorm,
    fold_batchnorm_params,
    mean_output_error,
)
from qjax.nn.hooks import LayerHook, OpKind, join_path, layer_hook, wrapped_contractions
from qjax.nn.linen import FakeQuantDotGeneral
from qjax.nn.model import (
    QuantizedWeight,
    UnusedRuleWarning,
    calibrate,
    convert,
    learned_quantizer_params,
    pin_weight_qparams,
    prepare_kernels,
    quantizable_layers,
    quantize_model,
    quantized_ops,
    set_kernels,
    set_mode,
    summary,
)
from qjax.nn.ops import MODES, CodebookIndices, KernelLayout, Mode, QuantizedEmbedding, QuantizedOp
from qjax.nn.rules import ActivationScale, Observer, Rule
from qjax.nn.stats import QuantStats, StaticQParams

__all__ = [
    "MODES",
    "ActivationScale",
    "CodebookIndices",
    "FakeQuantDotGeneral",
    "FoldedBatchNorm",
    "HookCall",
    "KernelLayout",
    "LayerHook",
    "Mode",
    "Observer",
    "OpKind",
    "QuantStats",
    "QuantizedEmbedding",
    "QuantizedOp",
    "QuantizedWeight",
    "Rule",
    "StaticQParams",
    "UnusedRuleWarning",
    "bias_correction",
    "calibrate",
    "channel_outliers",
    "convert",
    "fold_batchnorm",
    "fold_batchnorm_params",
    "format_table",
    "join_path",
    "kurtosis",
    "layer_diagnostics",
    "layer_hook",
    "learned_quantizer_params",
    "mean_output_error",
    "pin_weight_qparams",
    "prepare_kernels",
    "quantizable_layers",
    "quantize_model",
    "quantized_ops",
    "record_hook_calls",
    "set_kernels",
    "set_mode",
    "sqnr_db",
    "summary",
    "wrapped_contractions",
]
