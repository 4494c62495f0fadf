"""Quantization numerics: formats, granularity, rounding, calibration, QArray, bit packing,
Hadamard rotations.

Pure array functions, no autodiff; :mod:`qjax.ste` builds the differentiable estimators on top.
Formats, rounding schemes and calibration methods are open to plug-ins
(:func:`register_format`, :func:`register_rounding`, :func:`register_calibration`; see
:mod:`qjax.numerics.registry` and ``docs/plugins.md``).
"""

from qjax.numerics.calibration import calibrate, register_calibration
from qjax.numerics.fields import SpecError, SpecTypeError, parse_enum
from qjax.numerics.formats import (
    FORMAT_NAMES,
    CustomFormat,
    MXScaleRounding,
    QParams,
    format_names,
    parse_format,
    register_format,
)
from qjax.numerics.hadamard import (
    hadamard,
    hadamard_factors,
    hadamard_transform,
    is_hadamard_order,
    random_hadamard,
)
from qjax.numerics.packing import pack, unpack
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import dequantize, quantize, quantize_dequantize
from qjax.numerics.registry import ENTRY_POINT_GROUP, PluginError, Registry, load_entry_points, load_plugins
from qjax.numerics.rounding import Rounding, RoundingScheme, register_rounding
from qjax.numerics.spec import Calibration, Granularity, QuantSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "FORMAT_NAMES",
    "Calibration",
    "CustomFormat",
    "Granularity",
    "MXScaleRounding",
    "PluginError",
    "QArray",
    "QParams",
    "QuantSpec",
    "Registry",
    "Rounding",
    "RoundingScheme",
    "SpecError",
    "SpecTypeError",
    "calibrate",
    "dequantize",
    "format_names",
    "hadamard",
    "hadamard_factors",
    "hadamard_transform",
    "is_hadamard_order",
    "load_entry_points",
    "load_plugins",
    "pack",
    "parse_enum",
    "parse_format",
    "quantize",
    "quantize_dequantize",
    "random_hadamard",
    "register_calibration",
    "register_format",
    "register_rounding",
    "unpack",
]
