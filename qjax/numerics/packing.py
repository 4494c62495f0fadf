"""Bit packing of sub-byte values along the last (contiguous) axis.

``bits`` = 4 packs two values per byte, 2 packs four. Value ``j`` of each byte sits in bits
``[j * bits, (j + 1) * bits)`` (the first value in the low bits). A last axis whose length is not
a multiple of the values per byte is padded with zeros; :func:`unpack` takes the true length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PACKABLE = (2, 4)


def _check_bits(bits: int) -> int:
    if bits not in _PACKABLE:
        raise ValueError(f"bits={bits} cannot be packed; use 2 (four per byte) or 4 (two per byte)")
    return 8 // bits


def _shifts(per: int, bits: int, ndim: int) -> jax.Array:
    """Bit offsets of the values in a byte, shaped to broadcast over the last axis of rank ``ndim``."""
    return (jnp.arange(per, dtype=jnp.int32) * bits).reshape((1,) * (ndim - 1) + (per,))


def packed_length(n: int, bits: int) -> int:
    """Bytes along the last axis after packing ``n`` values."""
    per = _check_bits(bits)
    return -(-n // per)


def pack(values: jax.Array, bits: int) -> jax.Array:
    """Pack integer ``values`` (each fitting in ``bits`` bits, signed or not) into uint8."""
    per = _check_bits(bits)
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise TypeError(f"pack needs integer values; got dtype {values.dtype}")
    if values.ndim == 0:
        raise ValueError("pack needs at least one axis; reshape the scalar to (1,)")
    n = values.shape[-1]
    pad = packed_length(n, bits) * per - n
    v = values.astype(jnp.int32) & (2**bits - 1)
    if pad:
        v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
    v = v.reshape((*v.shape[:-1], -1, per))
    return jnp.sum(v << _shifts(per, bits, v.ndim), axis=-1).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, n: int, signed: bool) -> jax.Array:
    """Inverse of :func:`pack`: the first ``n`` values, as int8 (signed) or uint8."""
    per = _check_bits(bits)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack needs uint8 packed data; got dtype {packed.dtype}")
    shifts = _shifts(per, bits, packed.ndim + 1)
    v = (packed.astype(jnp.int32)[..., None] >> shifts) & (2**bits - 1)
    v = v.reshape((*packed.shape[:-1], -1))[..., :n]
    if signed:
        sign = 2 ** (bits - 1)
        return ((v ^ sign) - sign).astype(jnp.int8)
    return v.astype(jnp.uint8)
