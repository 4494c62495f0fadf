"""The options of the W4A16 GPU body (``qjax.kernels.experimental.w4a16_variants``): ``swap_ab``
(the transposed tile) and the unpacks ``"convert"`` and ``"asm"`` (PTX) give the values of the main
kernel; the PTX's bit logic run through an emulation of its instructions; lowering; refusals."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.kernels.experimental.w4a16_variants import asm_unpack_source, w4a16_matmul_variant
from qjax.kernels.w4a16 import MAGIC, w4a16_matmul, w4a16_matmul_reference
from tests.kernels.test_w4a16 import assert_close, make_weight


@pytest.mark.parametrize(
    ("m", "dtype", "split_k", "asym", "bias"),
    [(1, jnp.bfloat16, 1, False, True), (1, jnp.float32, 2, True, False), (17, jnp.float16, 3, True, True)],
)
def test_swap_ab_matches_reference(m, dtype, split_k, asym, bias):
    """The transposed tile (w^T x^T)^T gives y like the plain kernel: within float rounding of the
    reference, M = 1 and 17, split and unsplit K, signed and asymmetric weights."""
    rng = np.random.default_rng(m + split_k)
    k, n, g = 640, 130, 64
    _, _, _, w = make_weight(rng, k, n, g, asym)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    b = jnp.asarray(rng.normal(size=(n,)), jnp.float32) if bias else None
    f = functools.partial(w4a16_matmul_variant, backend="interpret", split_k=split_k, swap_ab=True)
    y = jax.jit(f)(x, w, bias=b)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, w4a16_matmul_reference(x, w, bias=b), dtype)
    plain = jax.jit(functools.partial(w4a16_matmul, backend="interpret", split_k=split_k))(x, w, bias=b)
    assert_close(y, plain, dtype)


@pytest.mark.parametrize("m", [1, 256])
@pytest.mark.parametrize("asym", [False, True])
def test_swap_ab_lowers_for_cuda(m, asym, lowered):
    _, _, _, w = make_weight(np.random.default_rng(0), 512, 384, 128, asym)
    x = jnp.zeros((m, 512), jnp.bfloat16)
    f = jax.jit(functools.partial(w4a16_matmul_variant, backend="gpu", swap_ab=True))
    assert "triton" in lowered(f, x, w, platform="cuda").lower()


def test_swap_ab_is_refused_on_tpu():
    _, _, _, w = make_weight(np.random.default_rng(1), 96, 8, 32, False)
    with pytest.raises(ValueError, match=r"swap_ab=True is an option of the GPU kernel"):
        w4a16_matmul_variant(jnp.zeros((2, 96), jnp.float32), w, backend="tpu", swap_ab=True)


def _run_ptx(src: str, regs: dict) -> dict:
    """Run the PTX subset of the asm unpack (mov.b32, prmt.b32 default mode, shr.u32, lop3.b32) on
    numpy uint32 arrays, one lane per asm instance; ``regs`` holds the inputs, the result all
    registers. Semantics from the PTX ISA: prmt picks result byte i by selector nibble i from the
    eight bytes {b, a} (a = bytes 0-3), the nibble's bit 3 replicating the picked byte's sign; lop3
    computes, bit by bit, immLut[(a << 2) | (b << 1) | c]."""
    regs = {k: np.asarray(v, np.uint64) for k, v in regs.items()}
    mask = np.uint64(0xFFFFFFFF)

    def val(tok):
        tok = tok.strip()
        return np.uint64(int(tok, 0)) if tok[0].isdigit() else regs[tok]

    for line in src.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in args]
        if op == "mov.b32":
            out = a[0] + np.zeros_like(next(iter(regs.values())))
        elif op == "shr.u32":
            out = (a[0] & mask) >> a[1]
        elif op == "prmt.b32":
            sel = int(a[2])
            pool = [(a[0] >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)]
            pool += [(a[1] >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)]
            out = np.zeros_like(a[0])
            for i in range(4):
                nib = (sel >> (4 * i)) & 0xF
                byte = pool[nib & 7]
                if nib & 8:
                    byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
                out |= byte << np.uint64(8 * i)
        elif op == "lop3.b32":
            lut, out = int(a[3]), np.zeros_like(a[0])
            for k in range(8):
                if (lut >> k) & 1:
                    terms = [x if (k >> shift) & 1 else ~x for x, shift in zip(a[:3], (2, 1, 0), strict=True)]
                    out |= terms[0] & terms[1] & terms[2]
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
        regs[dst] = out & mask
    return regs


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("high", [False, True])
def test_asm_unpack_builds_the_float_bits(dtype, high):
    """The PTX of unpack='asm' turns four packed bytes (element k in byte k of the 32-bit input
    register) into the bits of 2**m + nibble, elements 0, 1 in the two 16-bit lanes of the first
    output register and 2, 3 in the second: run on every byte value in every position."""
    rng = np.random.default_rng(0)
    data = np.concatenate([np.repeat(np.arange(256), 4), rng.integers(0, 256, 4 * 4096)]).astype(np.uint8)
    data = data.reshape(-1, 4)
    data[:256] = np.stack(
        [np.roll(np.arange(256), 64 * j) for j in range(4)], axis=1
    )  # each value in each lane
    word = data.astype(np.uint64) @ (np.uint64(1) << np.arange(0, 32, 8, dtype=np.uint64))
    out = _run_ptx(asm_unpack_source(dtype, high), {"$2": word})
    nibble = (data >> 4) if high else (data & 0xF)
    expect = nibble.astype(np.uint64) | np.uint64(MAGIC[jnp.dtype(dtype)][1])
    lanes = [(out[r] >> np.uint64(16 * i)) & np.uint64(0xFFFF) for r in ("$0", "$1") for i in (0, 1)]
    np.testing.assert_array_equal(np.stack(lanes, axis=1), expect)
    # and these bits are the floats 2**m + nibble
    floats = np.stack(lanes, axis=1).astype(np.uint16).view(jnp.dtype(dtype)).astype(np.float32)
    np.testing.assert_array_equal(floats, MAGIC[jnp.dtype(dtype)][2] + nibble.astype(np.float32))


def test_asm_unpack_lowers_for_cuda_and_is_refused_elsewhere(lowered):
    _, _, _, w = make_weight(np.random.default_rng(0), 512, 384, 128, True)
    x = jnp.zeros((16, 512), jnp.bfloat16)
    f = jax.jit(functools.partial(w4a16_matmul_variant, backend="gpu", unpack="asm"))
    text = lowered(f, x, w, platform="cuda")
    assert "triton" in text.lower() and "lop3.b32" in text and "prmt.b32" in text
    with pytest.raises(ValueError, match=r"unpack='asm' is PTX inline assembly: backend='gpu' only"):
        w4a16_matmul_variant(x, w, backend="interpret", unpack="asm")
    with pytest.raises(ValueError, match=r"unpack='asm' builds 16-bit floats"):
        w4a16_matmul_variant(x.astype(jnp.float32), w, backend="gpu", unpack="asm")
    with pytest.raises(ValueError, match=r"unpack='lut': expected one of"):
        w4a16_matmul_variant(x, w, backend="interpret", unpack="lut")


def test_convert_unpack_matches_reference():
    rng = np.random.default_rng(5)
    _, _, _, w = make_weight(rng, 256, 130, 64, True)
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.bfloat16)
    y = jax.jit(functools.partial(w4a16_matmul_variant, backend="interpret", unpack="convert"))(x, w)
    assert_close(y, w4a16_matmul_reference(x, w), jnp.bfloat16)
