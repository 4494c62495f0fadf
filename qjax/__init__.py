"""qjax: quantization research for JAX."""

from qjax import nn, training
from qjax.numerics import (
    FORMAT_NAMES,
    Calibration,
    Granularity,
    QArray,
    QParams,
    QuantSpec,
    Rounding,
    calibrate,
    dequantize,
    pack,
    parse_format,
    quantize,
    quantize_dequantize,
    unpack,
)
from qjax.ste import Estimator, fake_quant, lsq_init_scale

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
    "__version__",
    "calibrate",
    "dequantize",
    "fake_quant",
    "lsq_init_scale",
    "nn",
    "pack",
    "parse_format",
    "quantize",
    "quantize_dequantize",
    "training",
    "unpack",
]
