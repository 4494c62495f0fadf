"""Number formats: what a quantized value can be, and how a scaled value is rounded into it.

Every format answers three questions for the rest of :mod:`qjax.numerics`:

* ``qparams(lo, hi, symmetric)``: the scale (and zero point) of each block from its range,
* ``encode(x, qparams, rounding, noise)``: the quantized values of ``x`` (pure math, no storage),
* ``decode(values, qparams)``: the real values they stand for.

The arrays given to these methods are *tiled* (see :mod:`qjax.numerics.tiling`): the quantization
parameters broadcast against ``x``, one entry per block.

Integer formats follow the affine convention of the design notes:

.. math::

    q = \\operatorname{clip}(\\operatorname{round}(r / S) + Z, q_{min}, q_{max}), \\qquad
    \\hat r = S (q - Z).

Signed symmetric: :math:`Z = 0` and :math:`S = 2 \\max|r| / (q_{max} - q_{min})`. On the narrow
range (the default) :math:`[-(2^{b-1}-1), 2^{b-1}-1]` that is :math:`S = \\max|r| / q_{max}`, and
:math:`\\pm\\max|r|` are the end levels. On the full range (``narrow=False``; ``QuantSpec``'s
``narrow_range=False``) :math:`[-2^{b-1}, 2^{b-1}-1]`, all :math:`2^b` levels, it is
:math:`S = \\max|r| / (2^{b-1} - 1/2)`, the grid of GPTQ's ``sym`` (written there as
:math:`S = 2\\max|r| / (2^b - 1)` with zero point :math:`2^{b-1}` on unsigned codes), AQT and
Qwix: the step is finer by :math:`(2^{b-1} - 1/2) / (2^{b-1} - 1)`, and :math:`\\pm\\max|r|` fall on
the rounding ties :math:`\\pm(2^{b-1} - 1/2)` (up to float32 rounding of the quotient):
:math:`-\\max|r|` becomes :math:`-2^{b-1}` or :math:`-(2^{b-1}-1)`, and :math:`+\\max|r|`, which
no level reaches, becomes :math:`2^{b-1}-1`, rounded there or rounded (half to even) to
:math:`2^{b-1}` and clipped by design; either way an error of :math:`S/2`. Unsigned symmetric:
:math:`[0, 2^b - 1]`, :math:`S = \\max(r_{max}, 0) / q_{max}`, negative values clip to 0.
Asymmetric: the full range, the range widened to include 0,
:math:`S = (r_{max} - r_{min}) / (q_{max} - q_{min})` and an integer
:math:`Z \\in [q_{min}, q_{max}]`, so 0.0 is exact.

**Clipping.** ``unclipped(x, qp, rounding, noise)`` says where clipping leaves the rounded value
of ``x`` unchanged, the mask of the clipped straight-through estimator: for integers
:math:`q_{min} \\le \\operatorname{round}(r/S) + Z \\le q_{max}` (the rounding and noise of
``encode``, before its clip); for float formats :math:`|\\operatorname{round}(r/S)| \\le f_{max}`,
with the rounding onto the format's grid continued past :math:`f_{max}` in its top binade's step.
An element within half a step beyond the range is therefore unclipped (it rounds onto the edge
level), and an element of the range a scale was calibrated from is clipped only where the grid
itself clips (the full range's :math:`+\\max|r|`, a saturating MX block maximum).

Division is carried out as multiplication by a reciprocal rounded once to float32:
:math:`r / S` is :math:`r \\cdot \\mathrm{fl}(1/S)` and the symmetric scale is
:math:`\\max|r| \\cdot \\mathrm{fl}(2 / (q_{max} - q_{min}))` (:math:`\\mathrm{fl}(1/q_{max})`
when narrow). XLA rewrites divisions by broadcast or constant divisors into such products anyway;
writing them out makes eager, jitted, simulated and stored paths agree bit for bit.

**Plug-ins.** A new format subclasses :class:`CustomFormat` (``qparams``, ``encode``, ``decode``,
``clip_range``, optionally ``unclipped``, its storage bits and value dtype) and is registered under
its name with :func:`register_format`; ``QuantSpec(dtype=name)`` then accepts it. It takes part in
the simulated paths (``fake_quant``, PTQ evaluation, QAT with ``ste`` / ``clipped_ste`` / plug-in
estimators) and is stored as a ``QArray`` (bit-packed below 8 bits); a served layer dequantizes it
and contracts in float (weight-only: the integer and fp8 kernels take the built-in formats). The
built-in formats are registered in the same registry, :data:`FORMATS`.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.fields import did_you_mean
from qjax.numerics.registry import Registry
from qjax.numerics.rounding import round_to_float_grid, round_to_integer

# The smallest positive normal float32: every scale is at least this, so that no finite input
# (all zeros, constants, subnormals) ever divides by zero.
MIN_SCALE = float(np.finfo(np.float32).tiny)
FLOAT32_MAX = float(np.finfo(np.float32).max)


class QParams(NamedTuple):
    """Quantization parameters of a tensor, one entry per block.

    ``scale`` has the dtype the format stores it in (float32 for integer and float formats,
    float8_e8m0fnu for MX, float8_e4m3fn for NVFP4); ``tensor_scale`` is the second-level float32
    scale of NVFP4 and ``None`` otherwise; ``zero_point`` is ``None`` where it is 0 by definition.
    """

    scale: jax.Array
    zero_point: jax.Array | None = None
    tensor_scale: jax.Array | None = None


class Format(Protocol):
    """What every format provides (see the module docstring)."""

    name: str

    @property
    def container_bits(self) -> int: ...

    @property
    def value_dtype(self) -> jnp.dtype: ...

    def qparams(self, lo: jax.Array, hi: jax.Array, symmetric: bool) -> QParams: ...

    def encode(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array: ...

    def decode(self, values: jax.Array, qp: QParams) -> jax.Array: ...

    def clip_range(self, qp: QParams) -> tuple[jax.Array, jax.Array]: ...

    def unclipped(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array: ...


def _inverse(c: float) -> float:
    """``1/c`` rounded once to float32: scales multiply by it, so eager and jitted code agree."""
    return float(np.float32(1.0 / c))


def _container_bits(bits: int) -> int:
    """Storage bits of one value: values of 1..7 bits are bit-packed at their own width
    (:mod:`qjax.numerics.packing`), 8-bit ones take a byte."""
    return bits if bits < 8 else 8


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """A signed or unsigned integer of 2..8 bits.

    ``narrow``: a symmetric signed grid takes the narrow range :math:`[-(2^{b-1}-1), 2^{b-1}-1]`
    (``True``, the registered formats) or all :math:`2^b` levels :math:`[-2^{b-1}, 2^{b-1}-1]`
    (``False``; see the module docstring). Asymmetric and unsigned grids always use the full range.
    ``QuantSpec.format`` gives the variant its ``narrow_range`` asks for.
    """

    bits: int
    signed: bool
    narrow: bool = True

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def container_bits(self) -> int:
        return _container_bits(self.bits)

    @property
    def value_dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.int8 if self.signed else jnp.uint8)

    def qrange(self, symmetric: bool) -> tuple[int, int]:
        """``(qmin, qmax)``: the narrow signed range when symmetric and ``narrow``, else the full range."""
        if not self.signed:
            return 0, 2**self.bits - 1
        qmax = 2 ** (self.bits - 1) - 1
        return (-qmax if symmetric and self.narrow else -qmax - 1), qmax

    def symmetric_scale(self, amax: jax.Array) -> jax.Array:
        """The scale of the symmetric grid (:math:`Z = 0`) for the range :math:`[-a, a]`:
        :math:`S = 2a / (q_{max} - q_{min})` when signed (:math:`a / q_{max}` narrow,
        :math:`a / (q_{max} + 1/2)` full), :math:`a / q_{max}` when unsigned; at least
        :data:`MIN_SCALE`."""
        qmin, qmax = self.qrange(True)
        half_levels = (qmax - qmin) / 2 if self.signed else qmax
        return jnp.maximum(amax * _inverse(half_levels), MIN_SCALE)

    def qparams(self, lo: jax.Array, hi: jax.Array, symmetric: bool) -> QParams:
        qmin, qmax = self.qrange(symmetric)
        if symmetric:
            # Unsigned symmetric means Z = 0 over [0, qmax]: negative values clip to 0.
            amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) if self.signed else jnp.maximum(hi, 0.0)
            return QParams(scale=self.symmetric_scale(amax))
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        # Halves first: no overflow for ranges near 3e38, and exact products (no FMA ambiguity).
        scale = jnp.maximum((hi * 0.5 - lo * 0.5) * _inverse((qmax - qmin) / 2), MIN_SCALE)
        # Z = round(qmin - lo/S) = qmin - round(lo/S): half-to-even rounding is odd-symmetric.
        zero_point = jnp.clip(qmin - jnp.round(lo * (1.0 / scale)), qmin, qmax)
        return QParams(scale=scale, zero_point=zero_point.astype(self.value_dtype))

    def _zero(self, qp: QParams) -> jax.Array:
        return jnp.zeros((), jnp.int32) if qp.zero_point is None else qp.zero_point.astype(jnp.int32)

    def _grid_range(self, qp: QParams) -> tuple[int, int]:
        return self.qrange(qp.zero_point is None and self.signed)

    def _rounded(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        """:math:`\\operatorname{round}(x/S) + Z` before the clip, as float32."""
        z = self._zero(qp).astype(jnp.float32)
        return round_to_integer(x * (1.0 / qp.scale), rounding, noise) + z

    def encode(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        qmin, qmax = self._grid_range(qp)
        # Clip while still float: a huge x / S must saturate, not overflow the int32 cast.
        return jnp.clip(self._rounded(x, qp, rounding, noise), qmin, qmax).astype(jnp.int32)

    def unclipped(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        """:math:`q_{min} \\le \\operatorname{round}(x/S) + Z \\le q_{max}`: clipping leaves the
        code unchanged."""
        qmin, qmax = self._grid_range(qp)
        v = self._rounded(x, qp, rounding, noise)
        return (v >= qmin) & (v <= qmax)

    def decode(self, values: jax.Array, qp: QParams) -> jax.Array:
        r = (values.astype(jnp.int32) - self._zero(qp)).astype(jnp.float32) * qp.scale
        # A rounded Z can put the grid's edge up to S/2 beyond a range near 3.4e38: saturate.
        return jnp.clip(r, -FLOAT32_MAX, FLOAT32_MAX)

    def clip_range(self, qp: QParams) -> tuple[jax.Array, jax.Array]:
        qmin, qmax = self._grid_range(qp)
        z = self._zero(qp).astype(jnp.float32)
        lo, hi = (qmin - z) * qp.scale, (qmax - z) * qp.scale
        return jnp.clip(lo, -FLOAT32_MAX, FLOAT32_MAX), jnp.clip(hi, -FLOAT32_MAX, FLOAT32_MAX)


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A low-precision float (fp8 e4m3fn / e5m2, fp4 e2m1fn) with one float32 scale per block.

    The scale maps the block's absolute maximum onto the format's largest finite value,
    :math:`S = \\max|r| / f_{max}`; values are rounded onto the format's grid and saturate at
    :math:`\\pm f_{max}` (never NaN: e4m3fn has no infinity).
    """

    name: str

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(getattr(jnp, self.name))

    @property
    def container_bits(self) -> int:
        return int(jnp.finfo(self.dtype).bits)

    @property
    def value_dtype(self) -> jnp.dtype:
        return self.dtype

    @functools.cached_property
    def max(self) -> float:
        return float(jnp.finfo(self.dtype).max)

    @functools.cached_property
    def emax(self) -> int:
        """Exponent of the largest finite value (8 for e4m3fn, 15 for e5m2, 2 for e2m1fn)."""
        return int(np.floor(np.log2(self.max)))

    def _round_unsaturated(self, y: jax.Array, rounding: str, noise: jax.Array | None) -> jax.Array:
        """Float32 ``y`` rounded onto this format's grid, continued past the largest value."""
        fi = jnp.finfo(self.dtype)
        return round_to_float_grid(y, int(fi.nmant), int(fi.minexp), rounding, noise)

    def round(self, y: jax.Array, rounding: str, noise: jax.Array | None) -> jax.Array:
        """Round float32 ``y`` onto this format's grid, saturating at the largest value."""
        return jnp.clip(self._round_unsaturated(y, rounding, noise), -self.max, self.max)

    def unsaturated(self, y: jax.Array, rounding: str, noise: jax.Array | None) -> jax.Array:
        """Whether scaled ``y`` rounds within :math:`\\pm f_{max}` (saturation changes nothing)."""
        return jnp.abs(self._round_unsaturated(y, rounding, noise)) <= self.max

    def qparams(self, lo: jax.Array, hi: jax.Array, symmetric: bool) -> QParams:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        return QParams(scale=jnp.maximum(amax * _inverse(self.max), MIN_SCALE))

    def encode(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        return self.round(x * (1.0 / qp.scale), rounding, noise)

    def decode(self, values: jax.Array, qp: QParams) -> jax.Array:
        return values.astype(jnp.float32) * qp.scale

    def clip_range(self, qp: QParams) -> tuple[jax.Array, jax.Array]:
        return -self.max * qp.scale, self.max * qp.scale

    def unclipped(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        return self.unsaturated(x * (1.0 / qp.scale), rounding, noise)


class MXScaleRounding(enum.StrEnum):
    """How an MX block's shared exponent is chosen (see :class:`BlockFloatFormat`)."""

    FLOOR = "floor"  # the OCP MX rule: floor(log2 amax) - emax; the block maximum may saturate
    CEIL = "ceil"  # ceil(log2(amax / fmax)): nothing saturates


@dataclasses.dataclass(frozen=True)
class BlockFloatFormat:
    """MX (OCP Microscaling) and NVFP4 block formats: low-precision floats sharing a block scale.

    * MXFP8 / MXFP4: blocks of 32 e4m3fn / e2m1fn elements with a power-of-two (E8M0) scale
      :math:`S = 2^k`; elements saturate at :math:`\\pm f_{max}`. ``scale_rounding`` picks the
      shared exponent :math:`k` (:class:`MXScaleRounding`):

      .. math::

          k_{floor} = \\lfloor \\log_2 \\max|r| \\rfloor - e_{max}, \\qquad
          k_{ceil} = \\lceil \\log_2 (\\max|r| / f_{max}) \\rceil,

      with :math:`e_{max} = \\lfloor \\log_2 f_{max} \\rfloor`. ``floor`` is the OCP MX rule: a
      block's maximum scales to :math:`[2^{e_{max}}, 2^{e_{max}+1})`, above :math:`f_{max}` when
      its mantissa exceeds :math:`f_{max}`'s, and saturates at :math:`f_{max}` when it rounds
      above it. ``ceil`` is the smallest
      :math:`k` with :math:`\\max|r| / 2^k \\le f_{max}`: nothing saturates, at the price of one
      binade of resolution in those blocks. With :math:`\\max|r| = f 2^e`,
      :math:`f \\in [1/2, 1)` (exact ``frexp``): :math:`k_{floor} = e - 1 - e_{max}` and
      :math:`k_{ceil} = k_{floor} + [f > f_{max} / 2^{e_{max}+1}]`. Both clip :math:`k` to
      :math:`[-126, 127]`.
    * NVFP4: blocks of 16 e2m1fn elements with an e4m3fn block scale and a float32 tensor scale
      :math:`S_t = \\max|r| / (448 \\cdot 6)`, block scale :math:`\\mathrm{fp8}(\\max_b|r| / (6 S_t))`.
    """

    name: str
    element: FloatFormat
    block_size: int
    scale_dtype_name: str  # "float8_e8m0fnu" or "float8_e4m3fn"
    scale_rounding: MXScaleRounding = MXScaleRounding.FLOOR  # MX only

    @property
    def is_mx(self) -> bool:
        """A power-of-two (E8M0) block scale: MXFP8, MXFP4."""
        return self.scale_dtype_name == "float8_e8m0fnu"

    @property
    def container_bits(self) -> int:
        return self.element.container_bits

    @property
    def value_dtype(self) -> jnp.dtype:
        return self.element.dtype

    @property
    def scale_dtype(self) -> jnp.dtype:
        return jnp.dtype(getattr(jnp, self.scale_dtype_name))

    def qparams(self, lo: jax.Array, hi: jax.Array, symmetric: bool) -> QParams:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        if self.is_mx:
            f, e = jnp.frexp(jnp.maximum(amax, MIN_SCALE))  # amax = f 2^e, f in [0.5, 1): exact
            exponent = e - 1 - self.element.emax
            if self.scale_rounding == MXScaleRounding.CEIL:
                # amax / 2^exponent = 2f 2^emax > fmax exactly when f > fmax / 2^(emax + 1)
                exponent = jnp.where(
                    f > self.element.max / 2.0 ** (self.element.emax + 1), exponent + 1, exponent
                )
            # 2^-126 at least (E8M0 reaches 2^-127, a float32 subnormal that CPUs may flush to 0).
            exponent = jnp.clip(exponent, -126, 127)
            scale = jnp.ldexp(jnp.ones_like(amax), exponent)
            # a block holding NaN or Inf gets E8M0's NaN scale: the whole block decodes to NaN, as a
            # non-finite value makes its block's scale non-finite in every other format
            scale = jnp.where(jnp.isfinite(amax), scale, jnp.nan)
            return QParams(scale=scale.astype(self.scale_dtype))
        scale_max = float(jnp.finfo(self.scale_dtype).max)
        tensor_scale = jnp.maximum(jnp.max(amax) * _inverse(scale_max * self.element.max), MIN_SCALE)
        block = jnp.clip(amax * (1.0 / (self.element.max * tensor_scale)), 0.0, scale_max)
        return QParams(scale=block.astype(self.scale_dtype), tensor_scale=tensor_scale)

    def _scale(self, qp: QParams) -> jax.Array:
        scale = qp.scale.astype(jnp.float32)
        if qp.tensor_scale is not None:
            scale = scale * qp.tensor_scale
        return jnp.maximum(scale, MIN_SCALE)  # an all-zero NVFP4 block has a zero fp8 scale

    def encode(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        return self.element.round(x * (1.0 / self._scale(qp)), rounding, noise)

    def decode(self, values: jax.Array, qp: QParams) -> jax.Array:
        return values.astype(jnp.float32) * self._scale(qp)

    def clip_range(self, qp: QParams) -> tuple[jax.Array, jax.Array]:
        s = self._scale(qp)
        return -self.element.max * s, self.element.max * s

    def unclipped(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        return self.element.unsaturated(x * (1.0 / self._scale(qp)), rounding, noise)


@dataclasses.dataclass(frozen=True)
class CodebookFormat:
    """Non-linear quantization: ``2**bits`` centroids found by k-means; values are indices.

    The codebook plays the role of the scale: ``decode(i) = codebook[i]`` per block.
    """

    bits: int

    @property
    def name(self) -> str:
        return f"kmeans{self.bits}"

    @property
    def container_bits(self) -> int:
        return _container_bits(self.bits)

    @property
    def value_dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.uint8)


class CustomFormat(abc.ABC):
    """Base class of a plug-in number format (register an instance with :func:`register_format`).

    The arrays given to the methods are tiled (see the module docstring): ``qp``'s entries
    broadcast against ``x`` and ``values``, one per block.

    Attributes:
      name: the name the format is registered under (what ``QuantSpec.dtype`` says).
      container_bits: storage bits of one value, 1..8 (below 8 the values are bit-packed).
      value_dtype: the dtype the values are stored as: ``int8`` / ``uint8`` for integer codes
        (signed codes need a signed dtype), or a float dtype such as ``float8_e4m3fn``.
    """

    name: str
    container_bits: int
    value_dtype: jnp.dtype

    @abc.abstractmethod
    def qparams(self, lo: jax.Array, hi: jax.Array, symmetric: bool) -> QParams:
        """The scale (zero point, tensor scale) of each block from its range ``[lo, hi]``."""

    @abc.abstractmethod
    def encode(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        """The stored values of float32 ``x``; round with
        ``qjax.numerics.rounding.round_to_integer(y, rounding, noise)`` so that every rounding
        scheme applies."""

    @abc.abstractmethod
    def decode(self, values: jax.Array, qp: QParams) -> jax.Array:
        """The float32 real values that ``values`` stand for."""

    @abc.abstractmethod
    def clip_range(self, qp: QParams) -> tuple[jax.Array, jax.Array]:
        """``(lo, hi)``: the smallest and largest representable real values of each block."""

    def unclipped(self, x: jax.Array, qp: QParams, rounding: str, noise: jax.Array | None) -> jax.Array:
        """Where clipping leaves the encoding of ``x`` unchanged (the clipped STE's mask); by
        default :math:`lo \\le x \\le hi` with ``(lo, hi) = clip_range(qp)``. Override it to
        count an element that rounds onto the range's edge as unclipped, as the built-ins do."""
        lo, hi = self.clip_range(qp)
        return (x >= lo) & (x <= hi)


AffineFormat = IntFormat | FloatFormat | BlockFloatFormat | CustomFormat
AnyFormat = AffineFormat | CodebookFormat

_FLOATS = ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")
_BLOCK_FLOATS = {
    "mxfp8": ("float8_e4m3fn", 32, "float8_e8m0fnu"),
    "mxfp4": ("float4_e2m1fn", 32, "float8_e8m0fnu"),
    "nvfp4": ("float4_e2m1fn", 16, "float8_e4m3fn"),
}
FORMAT_NAMES: tuple[str, ...] = (  # the built-in formats
    *(f"int{b}" for b in range(2, 9)),
    *(f"uint{b}" for b in range(2, 9)),
    *_FLOATS,
    *_BLOCK_FLOATS,
    *(f"kmeans{b}" for b in range(1, 9)),
)


def _unknown_format(registry: Registry[AnyFormat], name: object, field: str) -> str:
    names = registry.names()
    bits_hint = ""
    for prefix in ("uint", "int", "kmeans"):
        if isinstance(name, str) and name.startswith(prefix) and name[len(prefix) :].isdigit():
            low = 1 if prefix == "kmeans" else 2
            bits_hint = f"; {prefix} formats have {low}..8 bits"
            break
    return (
        f"{field}={name!r} is not a known format{bits_hint}{did_you_mean(name, names)} "
        f"Known formats: {', '.join(names)}"
    )


FORMATS: Registry[AnyFormat] = Registry("format", "dtype", unknown=_unknown_format, example="int8")


def _builtin_format(name: str) -> AnyFormat:
    if name in _FLOATS:
        return FloatFormat(name)
    if name in _BLOCK_FLOATS:
        element, block, scale = _BLOCK_FLOATS[name]
        return BlockFloatFormat(name, FloatFormat(element), block, scale)
    if name.startswith("kmeans"):
        return CodebookFormat(int(name[len("kmeans") :]))
    signed = name.startswith("int")
    return IntFormat(int(name[3 if signed else 4 :]), signed)


for _name in FORMAT_NAMES:
    FORMATS.register(_name, _builtin_format(_name))
FORMATS.seal()


def register_format(fmt: CustomFormat, *, override: bool = False) -> CustomFormat:
    """Register the plug-in format ``fmt`` under ``fmt.name``; ``QuantSpec(dtype=fmt.name)`` then
    uses it. Raises ``ValueError`` for a name already registered unless ``override=True``
    (built-in names are reserved), ``TypeError`` for an object that is not a
    :class:`CustomFormat`."""
    if not isinstance(fmt, CustomFormat):
        raise TypeError(
            f"register_format needs an instance of qjax.numerics.CustomFormat (with qparams, encode, "
            f"decode, clip_range); got {type(fmt).__name__}"
        )
    bits = getattr(fmt, "container_bits", None)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"format {fmt.name!r}: container_bits={bits!r} must be an int in 1..8")
    FORMATS.register(fmt.name, fmt, override=override)
    return fmt


def format_names() -> tuple[str, ...]:
    """Every format ``QuantSpec.dtype`` accepts: the built-ins (:data:`FORMAT_NAMES`), then the
    registered plug-ins."""
    return FORMATS.names()


def parse_format(name: str) -> AnyFormat:
    """The format called ``name`` (``"int4"``, ``"uint8"``, ``"float8_e4m3fn"``, ``"mxfp4"``,
    ``"nvfp4"``, ``"kmeans3"``, a registered plug-in, ...); for anything else a clear
    :class:`~qjax.numerics.fields.SpecError` (a ``ValueError``;
    :class:`~qjax.numerics.fields.SpecTypeError` for a non-string), ``field="dtype"``."""
    return FORMATS.get(name)
