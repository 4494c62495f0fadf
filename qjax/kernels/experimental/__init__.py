"""Experimental kernels: checked in the interpreter and by lowering, untimed on a device.

Nothing in the default paths (``import qjax``, serving with ``kernels`` = ``auto``, ``pallas``,
``xla``, ``reference``) imports this package: a caller reaches it by naming it, and the serving
paths that name one import it in the call (``kernels="mosaic_gpu"``, ``prepare_kernels(model,
w8_layout="nk")``). Each variant stays here until a device run promotes it to the main kernels or
deletes it; ``docs/benchmarks/kernels_status.md`` lists them, what checks each and its status.

* :mod:`~qjax.kernels.experimental.nk_layout`: W8A8, int8, FP8, block-scaled FP8 with the weight
  stored ``(N, K)`` (``w8a8_matmul_nk``, ...; ``prepare_nk``);
* :mod:`~qjax.kernels.experimental.hopper`: W8A8, int8, FP8 on Pallas Mosaic GPU (sm_90):
  ``w8a8_matmul_hopper``, ...;
* :mod:`~qjax.kernels.experimental.hopper_w4`: W4A16 at M <= 128 on Pallas Mosaic GPU:
  ``w4a16_matmul_hopper``;
* :mod:`~qjax.kernels.experimental.w4a16_variants`: the W4A16 GPU body with ``swap_ab``, the PTX
  unpack, or a body of the caller's (profiling): ``w4a16_matmul_variant``.
"""

from qjax.kernels.experimental.hopper import (
    HopperConfig,
    fp8_matmul_hopper,
    int8_matmul_hopper,
    w8a8_matmul_hopper,
)
from qjax.kernels.experimental.hopper_w4 import HopperW4, HopperW4Config, prepare_w4, w4a16_matmul_hopper
from qjax.kernels.experimental.nk_layout import (
    NK,
    fp8_block_matmul_nk,
    fp8_block_matmul_nk_reference,
    fp8_matmul_nk,
    fp8_matmul_nk_reference,
    int8_matmul_nk,
    int8_matmul_nk_reference,
    prepare_nk,
    w8a8_matmul_nk,
    w8a8_matmul_nk_reference,
)
from qjax.kernels.experimental.w4a16_variants import w4a16_matmul_variant

__all__ = [
    "NK",
    "HopperConfig",
    "HopperW4",
    "HopperW4Config",
    "fp8_block_matmul_nk",
    "fp8_block_matmul_nk_reference",
    "fp8_matmul_hopper",
    "fp8_matmul_nk",
    "fp8_matmul_nk_reference",
    "int8_matmul_hopper",
    "int8_matmul_nk",
    "int8_matmul_nk_reference",
    "prepare_nk",
    "prepare_w4",
    "w4a16_matmul_hopper",
    "w4a16_matmul_variant",
    "w8a8_matmul_hopper",
    "w8a8_matmul_nk",
    "w8a8_matmul_nk_reference",
]
