"""Quantization numerics: formats, granularity, rounding, calibration, QArray, bit packing.

Pure array functions, no autodiff; :mod:`qjax.ste` builds the differentiable estimators on top.
"""

from qjax.numerics.calibration import calibrate
from qjax.numerics.fields import SpecError, SpecTypeError, parse_enum
from qjax.numerics.formats import FORMAT_NAMES, QParams, parse_format
from qjax.numerics.packing import pack, unpack
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import dequantize, quantize, quantize_dequantize
from qjax.numerics.rounding import Rounding
from qjax.numerics.spec import Calibration, Granularity, QuantSpec

__all__ = [
    "FORMAT_NAMES",
    "Calibration",
    "Granularity",
    "QArray",
    "QParams",
    "QuantSpec",
    "Rounding",
    "SpecError",
    "SpecTypeError",
    "calibrate",
    "dequantize",
    "pack",
    "parse_enum",
    "parse_format",
    "quantize",
    "quantize_dequantize",
    "unpack",
]
