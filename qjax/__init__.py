"""qjax: quantization research for JAX."""

from qjax import methods, nn, training
from qjax.numerics import (
    FORMAT_NAMES,
    Calibration,
    Granularity,
    QArray,
    QParams,
    QuantSpec,
    Rounding,
    SpecError,
    SpecTypeError,
    calibrate,
    dequantize,
    pack,
    parse_format,
    quantize,
    quantize_dequantize,
    unpack,
)
from qjax.ste import Estimator, codebook_weight, fake_quant, lsq_init_scale, lsq_plus_init, lsq_plus_qparams

__version__ = "0.1.0"

__all__ = [
    "FORMAT_NAMES",
    "Calibration",
    "Estimator",
    "Granularity",
    "QArray",
    "QParams",
    "QuantSpec",
    "Rounding",
    "SpecError",
    "SpecTypeError",
    "__version__",
    "calibrate",
    "codebook_weight",
    "dequantize",
    "fake_quant",
    "lsq_init_scale",
    "lsq_plus_init",
    "lsq_plus_qparams",
    "methods",
    "nn",
    "pack",
    "parse_format",
    "quantize",
    "quantize_dequantize",
    "training",
    "unpack",
]
