"""Low-precision contractions: Pallas kernels (W8A8, W4A16, FP8 with per-row/column or 128 x 128
block scales, per-token activation quantization) with a pure-jnp ``*_reference`` beside each, the
XLA integer/fp8 path, and the dispatch between them that ``serve`` mode uses
(:mod:`qjax.kernels.dispatch`).

The kernels share :mod:`~qjax.kernels.common` (checks, padding, weight layout, epilogue),
:mod:`~qjax.kernels.launch` (grid, K ranges, masked rows, the ``pallas_call``),
:mod:`~qjax.kernels.tuning` (block sizes) and :mod:`~qjax.kernels.backend`. Variants not yet timed
on a device live in :mod:`qjax.kernels.experimental`, which only a caller that names it imports.
"""

from qjax.kernels.act_quant import quantize_per_token, quantize_per_token_reference
from qjax.kernels.backend import Backend, resolve_backend
from qjax.kernels.dispatch import (
    KERNEL_PATHS,
    KernelPath,
    check_kernel_path,
    kernel_plan,
    prepare_w4a16,
    resolved_kernel_path,
    serve_dot_general,
)
from qjax.kernels.fp8 import fp8_matmul, fp8_matmul_reference
from qjax.kernels.fp8_block import fp8_block_matmul, fp8_block_matmul_reference
from qjax.kernels.tuning import BLOCK_TABLE, Blocks, choose_blocks, set_blocks
from qjax.kernels.w4a16 import PackedW4, pack_w4, unpack_w4, w4a16_matmul, w4a16_matmul_reference
from qjax.kernels.w8a8 import int8_matmul, int8_matmul_reference, w8a8_matmul, w8a8_matmul_reference
from qjax.kernels.xla import quantized_conv, quantized_dot_general

__all__ = [
    "BLOCK_TABLE",
    "KERNEL_PATHS",
    "Backend",
    "Blocks",
    "KernelPath",
    "PackedW4",
    "check_kernel_path",
    "choose_blocks",
    "fp8_block_matmul",
    "fp8_block_matmul_reference",
    "fp8_matmul",
    "fp8_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "kernel_plan",
    "pack_w4",
    "prepare_w4a16",
    "quantize_per_token",
    "quantize_per_token_reference",
    "quantized_conv",
    "quantized_dot_general",
    "resolve_backend",
    "resolved_kernel_path",
    "serve_dot_general",
    "set_blocks",
    "unpack_w4",
    "w4a16_matmul",
    "w4a16_matmul_reference",
    "w8a8_matmul",
    "w8a8_matmul_reference",
]
