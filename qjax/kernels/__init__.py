"""Low-precision contractions: the XLA integer/fp8 path (every backend) and, later, Pallas kernels."""

from qjax.kernels.xla import quantized_conv, quantized_dot_general

__all__ = ["quantized_conv", "quantized_dot_general"]
