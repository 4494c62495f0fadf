"""Bit packing of sub-byte values along the last (contiguous) axis.

Values of ``bits`` bits (1..7) are laid end to end, little-endian: value ``j`` of a row occupies bits
``[j * bits, (j + 1) * bits)`` of the row's bit string, whose bit ``i`` is bit ``i % 8`` of byte
``i // 8``. So 4 bits pack two values per byte and 2 bits four (the first value in the low bits),
and 3 bits pack eight values into three bytes, a value sometimes straddling two bytes. A row of
``n`` values takes ``ceil(n * bits / 8)`` bytes, its last byte padded with zero bits; :func:`unpack`
takes the true length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_PACKABLE = tuple(range(1, 8))


def _group(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest run of values that fills whole bytes."""
    if bits not in _PACKABLE:
        raise ValueError(f"bits={bits} cannot be packed; use 1..7 (8-bit values are stored as they are)")
    g = math.gcd(8, bits)
    return 8 // g, bits // g


def _pieces(bits: int) -> list[tuple[int, int, int]]:
    """For each value ``j`` of a group and each byte it touches: ``(j, byte, shift)`` with the value's
    bits at ``value << shift`` of that byte when ``shift >= 0``, ``value >> -shift`` otherwise."""
    values, _ = _group(bits)
    out = []
    for j in range(values):
        start = j * bits
        for byte in range(start // 8, (start + bits - 1) // 8 + 1):
            out.append((j, byte, start - 8 * byte))
    return out


def packed_length(n: int, bits: int) -> int:
    """Bytes along the last axis after packing ``n`` values: ``ceil(n * bits / 8)``."""
    _group(bits)
    return -(-n * bits // 8)


def pack(values: jax.Array, bits: int) -> jax.Array:
    """Pack integer ``values`` (each fitting in ``bits`` bits, signed or not) into uint8."""
    per, nbytes = _group(bits)
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise TypeError(f"pack needs integer values; got dtype {values.dtype}")
    if values.ndim == 0:
        raise ValueError("pack needs at least one axis; reshape the scalar to (1,)")
    n = values.shape[-1]
    pad = -(-n // per) * per - n
    v = values.astype(jnp.int32) & (2**bits - 1)
    if pad:
        v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
    v = v.reshape((*v.shape[:-1], -1, per))  # (..., groups, values of a group)
    out = [jnp.zeros(v.shape[:-1], jnp.int32) for _ in range(nbytes)]
    for j, byte, shift in _pieces(bits):
        part = v[..., j] << shift if shift >= 0 else v[..., j] >> -shift
        out[byte] = out[byte] | (part & 255)
    packed = jnp.stack(out, axis=-1)  # (..., groups, bytes of a group)
    packed = packed.reshape((*packed.shape[:-2], -1))[..., : packed_length(n, bits)]
    return packed.astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, n: int, signed: bool) -> jax.Array:
    """Inverse of :func:`pack`: the first ``n`` values, as int8 (signed) or uint8."""
    per, nbytes = _group(bits)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack needs uint8 packed data; got dtype {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(
            f"unpack: {packed.shape[-1]} bytes along the last axis do not hold exactly {n} values of "
            f"{bits} bits ({packed_length(n, bits)} bytes); pass the unpacked length n"
        )
    b = packed.astype(jnp.int32)
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, -b.shape[-1] % nbytes)])  # whole groups
    b = b.reshape((*packed.shape[:-1], -1, nbytes))
    vals = [jnp.zeros(b.shape[:-1], jnp.int32) for _ in range(per)]
    for j, byte, shift in _pieces(bits):
        part = b[..., byte] >> shift if shift >= 0 else b[..., byte] << -shift
        vals[j] = vals[j] | part
    v = jnp.stack(vals, axis=-1) & (2**bits - 1)
    v = v.reshape((*packed.shape[:-1], -1))[..., :n]
    if signed:
        sign = 2 ** (bits - 1)
        return ((v ^ sign) - sign).astype(jnp.int8)
    return v.astype(jnp.uint8)
