"""``QArray``: a quantized tensor as it is stored, a pytree that ``jit``, ``vmap`` and
``device_put`` accept."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.numerics import packing
from qjax.numerics.formats import AnyFormat, BlockFloatFormat, FloatFormat, QParams
from qjax.numerics.spec import QuantSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized tensor: stored values plus the parameters that give them meaning.

    Invariant (affine formats): ``dequantize(q) == (q.values - q.zero_point) * q.scale`` with
    the parameters broadcast block-wise over the values (see :mod:`qjax.numerics.tiling`);
    k-means formats: ``dequantize(q) == q.codebook[..., q.values]`` per block.

    Attributes:
      data: the stored values. Sub-byte values (2-bit; 3- and 4-bit; fp4) are packed into uint8
        along the last axis (:mod:`qjax.numerics.packing`); 5..8-bit integers are int8/uint8;
        fp8 values keep their fp8 dtype.
      scale: one scale per block, grid-shaped, in the dtype the format defines (float32, E8M0
        for MX, e4m3fn for NVFP4); ``None`` for k-means.
      zero_point: grid-shaped integer zero points (asymmetric), else ``None``.
      tensor_scale: the float32 second-level scale of NVFP4, else ``None``.
      codebook: k-means centroids, ``grid_shape + (2**bits,)``, else ``None``.
      spec: the :class:`QuantSpec` that produced it (static).
      last_dim: the true length of the last axis (static; packing may pad it).
    """

    data: jax.Array
    scale: jax.Array | None
    zero_point: jax.Array | None
    tensor_scale: jax.Array | None
    codebook: jax.Array | None
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    last_dim: int = dataclasses.field(metadata=dict(static=True))

    def __getitem__(self, key: object) -> QArray:
        """``q[...]`` is ``q`` (how Flax layers read a variable's value); other indexing is refused."""
        if key is Ellipsis:
            return self
        raise TypeError(
            f"QArray supports only q[...], not q[{key!r}]: dequantize it first, e.g. qjax.dequantize(q)[...]"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape of the quantized tensor."""
        if self.data.ndim == 0:
            return ()
        return (*tuple(self.data.shape[:-1]), self.last_dim)

    @property
    def packed(self) -> bool:
        return self.spec.format.container_bits < 8 and self.data.ndim > 0

    @property
    def values(self) -> jax.Array:
        """Unpacked values: int8/uint8 integers or indices, or the fp8/fp4 values."""
        return unpack_values(self.data, self.spec, self.last_dim)

    @property
    def qparams(self) -> QParams:
        if self.scale is None:
            raise ValueError(f"a {self.spec.dtype} QArray has a codebook, not a scale; use q.codebook")
        return QParams(self.scale, self.zero_point, self.tensor_scale)

    @property
    def nbytes(self) -> int:
        """Bytes of real storage: packed values, scales, zero points and codebooks."""
        leaves = jax.tree_util.tree_leaves(self)
        return int(sum(leaf.size * leaf.dtype.itemsize for leaf in leaves))

    def compression_ratio(self, original_bits: int = 32) -> float:
        """Storage of the tensor in ``original_bits`` floats over this QArray's real storage."""
        size = 1
        for n in self.shape:
            size *= n
        return size * original_bits / (8 * self.nbytes)


def pack_values(values: jax.Array, spec: QuantSpec) -> jax.Array:
    """Logical values -> stored data (packed along the last axis when sub-byte)."""
    fmt = spec.format
    bits = fmt.container_bits
    if bits == 8 or values.ndim == 0:
        return values.astype(fmt.value_dtype)
    if _float_values(fmt):  # fp4: pack the 4-bit codes
        codes = jax.lax.bitcast_convert_type(values.astype(fmt.value_dtype), jnp.uint4)
        return packing.pack(codes.astype(jnp.uint8), bits)
    return packing.pack(values.astype(fmt.value_dtype), bits)


def unpack_values(data: jax.Array, spec: QuantSpec, last_dim: int) -> jax.Array:
    """Stored data -> logical values (inverse of :func:`pack_values`)."""
    fmt = spec.format
    bits = fmt.container_bits
    if bits == 8 or data.ndim == 0:
        return data
    if _float_values(fmt):
        codes = packing.unpack(data, bits, last_dim, signed=False)
        return jax.lax.bitcast_convert_type(codes.astype(jnp.uint4), fmt.value_dtype)
    signed = bool(
        jnp.issubdtype(fmt.value_dtype, jnp.signedinteger)
    )  # int formats: int8; uint, kmeans: uint8
    return packing.unpack(data, bits, last_dim, signed=signed)


def _float_values(fmt: AnyFormat) -> bool:
    """Values stored as a float dtype (fp4 elements, or a plug-in format's float values)."""
    return isinstance(fmt, FloatFormat | BlockFloatFormat) or bool(
        jnp.issubdtype(fmt.value_dtype, jnp.floating)
    )
