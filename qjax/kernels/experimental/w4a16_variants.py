"""Experimental: options of the W4A16 GPU body, plugged into :func:`qjax.kernels.w4a16.launch_w4a16`.

* ``swap_ab``: each program computes its tile transposed, ``(w^T x^T)^T`` (:data:`SWAPPED`), so the
  dequantized weight is the dot's left operand (the operand Hopper's ``wgmma`` may take from
  registers; the right one must sit in shared memory) and the small M the narrow side;
* ``unpack``: how nibbles become floats: ``"magic"`` (the main kernel's float-bits trick),
  ``"convert"`` (int32 -> float32 -> activation dtype) or ``"asm"`` (the same float bits as
  ``"magic"`` built four bytes at a time by PTX inline assembly, :func:`unpack_group_asm`: 16-bit
  activations, ``backend="gpu"`` only);
* ``gpu_body``: a body of the caller's on the kernel's grid, blocks and operands (it receives the
  keyword arguments of :func:`qjax.kernels.w4a16.gpu_kernel`): ``experiments.kernels.profile_w4a16``
  times parts of the kernel that way.

Every option gives the values of :func:`qjax.kernels.w4a16.w4a16_matmul`. Status:
``docs/benchmarks/kernels_status.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack

import jax
import jax.numpy as jnp

from qjax.kernels.backend import Backend, resolve_backend
from qjax.kernels.launch import LaunchOptions
from qjax.kernels.w4a16 import (
    MAGIC,
    PLAIN,
    GroupProduct,
    PackedW4,
    UnpackGroup,
    check_w4a16_call,
    gpu_kernel,
    launch_w4a16,
    magic_offset,
    unpack_group_convert,
    unpack_group_magic,
)

_TN = (((0,), (1,)), ((), ()))  # dot_general dimension numbers of a^T b^T: contract a's rows, b's columns


def _swapped_dot(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    """``w^T x^T`` (block_n, block_m): the dequantized weight is the dot's left operand."""
    return jax.lax.dot_general(w, x, _TN, preferred_element_type=jnp.float32, precision=precision)


SWAPPED = GroupProduct(
    lambda bm, bn: jnp.zeros((bn, bm), jnp.float32), _swapped_dot, jnp.transpose, jnp.transpose
)

# PTX for four packed bytes b0..b3 (one 32-bit register, $2) -> the 16-bit floats 2**m + nibble of
# their low nibbles (SHIFT 0) or high nibbles (SHIFT 4), elements 0, 1 in $0 and 2, 3 in $1: prmt
# spreads two bytes into the two 16-bit lanes of a register, shr moves the wanted nibbles to the
# bottom of each byte, lop3 (LUT 0xEA: (a & b) | c) keeps one nibble per lane and ORs in the
# exponent bits of 2**m. (One result per call: Pallas lowers inline assembly with one result.)
_ASM_UNPACK = """{
.reg .b32 zero, t0, t1;
mov.b32 zero, 0;
prmt.b32 t0, $2, zero, 0x5150;
prmt.b32 t1, $2, zero, 0x5352;
shr.u32 t0, t0, SHIFT;
shr.u32 t1, t1, SHIFT;
lop3.b32 $0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $1, t1, 0x000F000F, MAGIC, 0xEA;
}"""


def asm_unpack_source(dtype: Any, high: bool) -> str:
    """The PTX of :func:`unpack_group_asm` for 16-bit ``dtype`` (bf16: 2**7 + n, f16: 2**10 + n) and
    the low or ``high`` nibbles."""
    if jnp.dtype(dtype).itemsize != 2:
        raise ValueError(f"unpack='asm' builds 16-bit floats; got activations of {jnp.dtype(dtype)}")
    _, bits, _ = MAGIC[jnp.dtype(dtype)]
    return _ASM_UNPACK.replace("MAGIC", f"0x{bits:04X}{bits:04X}").replace("SHIFT", "4" if high else "0")


def unpack_group_asm(p: jax.Array, z: jax.Array | None, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """:func:`qjax.kernels.w4a16.unpack_group_magic` with the float bits made by PTX four bytes at a
    time (GPU only)."""
    from jax.experimental.pallas import triton as pltriton

    out = jax.ShapeDtypeStruct(p.shape, dtype)
    lo, hi = (
        pltriton.elementwise_inline_asm(
            asm_unpack_source(dtype, high), args=[p], constraints="=r,=r,r", pack=4, result_shape_dtypes=[out]
        )[0]
        for high in (False, True)
    )
    offset = magic_offset(z, dtype)
    return lo - offset, hi - offset


UNPACKS: dict[str, UnpackGroup] = {
    "magic": unpack_group_magic,
    "asm": unpack_group_asm,
    "convert": unpack_group_convert,
}


def w4a16_matmul_variant(
    x: jax.Array,
    w: PackedW4,
    *,
    swap_ab: bool = False,
    unpack: str = "magic",
    gpu_body: Callable[..., None] | None = None,
    bias: jax.Array | None = None,
    out_dtype: Any = None,
    **launch: Unpack[LaunchOptions],
) -> jax.Array:
    """:func:`qjax.kernels.w4a16.w4a16_matmul` (the same arguments) with the options of the module
    docstring: ``swap_ab``, ``unpack`` (one of :data:`UNPACKS`), ``gpu_body``."""
    check_w4a16_call(x, w, bias)
    be = launch["backend"] = resolve_backend(launch.get("backend"))
    if swap_ab and be == Backend.TPU:
        raise ValueError("swap_ab=True is an option of the GPU kernel; the TPU kernel has none")
    if unpack not in UNPACKS:
        raise ValueError(f"unpack={unpack!r}: expected one of {tuple(UNPACKS)}")
    if unpack == "asm":
        if be != Backend.GPU:
            raise ValueError(f"unpack='asm' is PTX inline assembly: backend='gpu' only, not {str(be)!r}")
        asm_unpack_source(x.dtype, False)  # 16-bit activations only
    return launch_w4a16(
        x,
        w,
        bias,
        out_dtype,
        **launch,
        gpu_body=gpu_body or gpu_kernel,
        unpack=UNPACKS[unpack],
        product=SWAPPED if swap_ab else PLAIN,
    )
