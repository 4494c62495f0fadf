"""``QuantSpec``: everything that defines a quantizer, as a frozen, validated value.

A spec is hashable (a static argument under ``jax.jit``) and round-trips through the plain
dictionaries of config files: ``QuantSpec.from_dict(spec.to_dict()) == spec``.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import typing
from collections.abc import Callable, Mapping
from typing import Any

from qjax.numerics.fields import SpecError, SpecTypeError, parse_enum, reject_unknown_fields
from qjax.numerics.formats import (
    AffineFormat,
    AnyFormat,
    BlockFloatFormat,
    CodebookFormat,
    FloatFormat,
    IntFormat,
    MXScaleRounding,
    parse_format,
)
from qjax.numerics.registry import Registry, parse_name
from qjax.numerics.rounding import ROUNDINGS, Rounding


class Granularity(enum.StrEnum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_TOKEN = "per_token"
    PER_GROUP = "per_group"
    PER_BLOCK = "per_block"


class Calibration(enum.StrEnum):
    """The built-in calibration methods (a spec also takes a registered plug-in's name)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


# name -> ``block_range(x32, spec, block) -> (lo, hi)``, grid-shaped; the built-ins are registered
# (and sealed) by qjax.numerics.calibration, plug-ins by its register_calibration
CALIBRATIONS: Registry[Callable[..., tuple[Any, Any]]] = Registry("calibration method", "calibration")


def _as_axes(value: Any, arg: str) -> int | tuple[int, ...] | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value) if len(value) > 1 else value[0]
    raise SpecTypeError(f"{arg}={value!r} must be an int or a non-empty list of ints", field=arg)


def _is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one tensor.

    A bad field raises :class:`~qjax.numerics.fields.SpecError` (a ``ValueError``) or
    :class:`~qjax.numerics.fields.SpecTypeError` (a ``TypeError``) whose ``field`` names it.

    Attributes:
      dtype: the format: ``int2..int8``, ``uint2..uint8``, ``float8_e4m3fn``, ``float8_e5m2``,
        ``float4_e2m1fn``, ``mxfp8``, ``mxfp4``, ``nvfp4``, ``kmeans1..kmeans8``, or a registered
        plug-in (:func:`qjax.numerics.register_format`).
      granularity: which elements share a scale (see :mod:`qjax.numerics.tiling`).
      axis: the channel axis or axes (``per_channel``), or the grouped axis (``per_group``).
      group_size: elements per group along ``axis`` (``per_group``; 32 for MX, 16 for NVFP4).
      block_shape: tile extents on the trailing axes (``per_block``), e.g. ``(128, 128)``.
      symmetric: ``Z = 0``; ``False`` = the full range with an integer ``Z`` (0.0 exact).
      narrow_range: symmetric signed integer formats only: ``True`` (default) = the narrow range
        :math:`[-(2^{b-1}-1), 2^{b-1}-1]` with :math:`S = \\max|r| / (2^{b-1}-1)`; ``False`` = all
        :math:`2^b` levels :math:`[-2^{b-1}, 2^{b-1}-1]` with :math:`S = \\max|r| / (2^{b-1} - 1/2)`
        (GPTQ's ``sym``, AQT, Qwix; :math:`\\pm\\max|r|` fall on rounding ties, and
        :math:`+\\max|r|`, which no level reaches, becomes :math:`2^{b-1}-1`, clipped by design
        where it rounds up; see :mod:`qjax.numerics.formats`).
        ``False`` with an asymmetric, unsigned, float, MX, NVFP4, codebook or plug-in format is a
        ``SpecError`` (asymmetric grids already use the full range).
      rounding: ``nearest`` (half to even), ``stochastic`` (needs a key), ``floor``, ``ceil``, or
        a registered plug-in (:func:`qjax.numerics.register_rounding`).
      calibration: how each block's range is chosen: ``minmax`` (absmax when symmetric),
        ``percentile`` (of ``|x|``, or both tails when asymmetric), ``mse`` (grid search
        of the clipping ratio minimising :math:`\\|x - Q(x)\\|^2`), or a registered plug-in
        (:func:`qjax.numerics.register_calibration`).
      percentile: the percentile used by ``calibration='percentile'``, in (50, 100].
      mse_grid: clipping ratios tried by ``calibration='mse'``: ``i / mse_grid``, i = 1..grid.
      kmeans_iters: Lloyd iterations for ``kmeans`` formats.
      mx_scale_rounding: MX formats (``mxfp8``, ``mxfp4``) only: the shared exponent of a block,
        ``floor`` (default, the OCP MX rule :math:`\\lfloor \\log_2 \\max|r| \\rfloor - e_{max}`:
        the block maximum may saturate at :math:`f_{max}`) or ``ceil``
        (:math:`\\lceil \\log_2(\\max|r| / f_{max}) \\rceil`: nothing saturates); see
        :class:`~qjax.numerics.formats.BlockFloatFormat`. ``ceil`` with another format is a
        ``SpecError``.
    """

    dtype: str = "int8"
    granularity: Granularity | str = Granularity.PER_TENSOR
    axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    block_shape: tuple[int, ...] | None = None
    symmetric: bool = True
    rounding: Rounding | str = Rounding.NEAREST
    calibration: Calibration | str = Calibration.MINMAX
    percentile: float = 99.99
    mse_grid: int = 100
    kmeans_iters: int = 30
    narrow_range: bool = True
    mx_scale_rounding: MXScaleRounding | str = MXScaleRounding.FLOOR

    def __post_init__(self) -> None:
        fmt = parse_format(self.dtype)
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("granularity", parse_enum(Granularity, self.granularity, "granularity"))
        set_("rounding", parse_name(ROUNDINGS, Rounding, self.rounding, "rounding"))
        set_("calibration", parse_name(CALIBRATIONS, Calibration, self.calibration, "calibration"))
        set_("mx_scale_rounding", parse_enum(MXScaleRounding, self.mx_scale_rounding, "mx_scale_rounding"))
        set_("axis", _as_axes(self.axis, "axis"))
        if self.block_shape is not None:
            set_("block_shape", tuple(self.block_shape))
        if not isinstance(self.symmetric, bool):
            raise SpecTypeError(f"symmetric={self.symmetric!r} must be true or false", field="symmetric")
        if not isinstance(self.narrow_range, bool):
            raise SpecTypeError(
                f"narrow_range={self.narrow_range!r} must be true or false", field="narrow_range"
            )
        self._check_granularity(fmt)
        self._check_format(fmt)
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, int | float):
            raise SpecTypeError(
                f"percentile={self.percentile!r} must be a number, e.g. 99.99", field="percentile"
            )
        if not 50.0 < float(self.percentile) <= 100.0:
            raise SpecError(
                f"percentile={self.percentile} must be in (50, 100], e.g. 99.99 for the 99.99th",
                field="percentile",
            )
        if not _is_int(self.mse_grid) or self.mse_grid < 2:
            raise SpecError(f"mse_grid={self.mse_grid!r} must be an int >= 2, e.g. 100", field="mse_grid")
        if not _is_int(self.kmeans_iters) or self.kmeans_iters < 1:
            raise SpecError(
                f"kmeans_iters={self.kmeans_iters!r} must be an int >= 1, e.g. 30", field="kmeans_iters"
            )

    def _check_granularity(self, fmt: AnyFormat) -> None:
        g = self.granularity
        if isinstance(fmt, BlockFloatFormat):
            if g != Granularity.PER_GROUP:
                raise SpecError(
                    f"dtype={self.dtype!r} shares one scale per {fmt.block_size} elements: set "
                    f"granularity='per_group', group_size={fmt.block_size} and axis=<contraction axis>",
                    field="dtype",
                )
            if self.group_size is None:
                object.__setattr__(self, "group_size", fmt.block_size)
            if self.group_size != fmt.block_size:
                raise SpecError(
                    f"group_size={self.group_size} does not match dtype={self.dtype!r}, whose "
                    f"blocks hold {fmt.block_size} elements; set group_size={fmt.block_size}",
                    field="group_size",
                )
        if g in (Granularity.PER_CHANNEL, Granularity.PER_GROUP) and self.axis is None:
            what = (
                "channel axis (e.g. -1 for the output features of a kernel)"
                if (g == Granularity.PER_CHANNEL)
                else "axis to group along (the contraction axis)"
            )
            raise SpecError(f"granularity={str(g)!r} needs axis=<{what}>", field="granularity")
        if g == Granularity.PER_GROUP:
            axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis or ())
            if len(axes) > 1 and (
                any(b != a + 1 for a, b in itertools.pairwise(axes)) or len({a < 0 for a in axes}) > 1
            ):
                raise SpecError(
                    f"granularity='per_group' groups along one axis, or along consecutive axes "
                    f"flattened in order (e.g. axis=(0, 1, 2), the H, W, I of a conv kernel); got "
                    f"axis={self.axis}",
                    field="granularity",
                )
            if len(axes) > 1 and isinstance(fmt, BlockFloatFormat):
                raise SpecError(
                    f"dtype={self.dtype!r} groups its blocks along one axis; got axis={self.axis}",
                    field="granularity",
                )
            if not (_is_int(self.group_size) and typing.cast(int, self.group_size) >= 1):
                raise SpecError(
                    f"granularity='per_group' needs group_size=<positive int>, e.g. 32 or 128; "
                    f"got {self.group_size!r}",
                    field="granularity",
                )
        elif self.group_size is not None:
            raise SpecError(
                f"group_size={self.group_size} only applies to granularity='per_group' "
                f"(granularity is {str(g)!r}); remove it or switch granularity",
                field="group_size",
            )
        if g == Granularity.PER_BLOCK:
            bs = self.block_shape
            if not bs or not all(_is_int(b) and b >= 1 for b in bs):
                raise SpecError(
                    f"granularity='per_block' needs block_shape=<positive ints>, e.g. (128, 128); got {bs!r}",
                    field="granularity",
                )
        elif self.block_shape is not None:
            raise SpecError(
                f"block_shape={self.block_shape} only applies to granularity='per_block'; "
                "remove it or switch granularity",
                field="block_shape",
            )
        if g in (Granularity.PER_TENSOR, Granularity.PER_TOKEN) and self.axis is not None:
            raise SpecError(
                f"axis={self.axis!r} has no meaning for granularity={str(g)!r}; remove it", field="axis"
            )

    def _check_format(self, fmt: AnyFormat) -> None:
        self._check_grid_options(fmt)
        if isinstance(fmt, FloatFormat | BlockFloatFormat) and not self.symmetric:
            raise SpecError(
                f"dtype={self.dtype!r} is a float format, symmetric by construction; "
                "set symmetric=True or use an integer format for asymmetric quantization",
                field="dtype",
            )
        if isinstance(fmt, CodebookFormat):
            if self.granularity not in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL):
                raise SpecError(
                    f"dtype={self.dtype!r} (k-means codebook) supports granularity 'per_tensor' "
                    f"or 'per_channel'; got {str(self.granularity)!r}",
                    field="dtype",
                )
            if self.rounding != Rounding.NEAREST or self.calibration != Calibration.MINMAX:
                raise SpecError(
                    f"dtype={self.dtype!r} assigns each value to its nearest centroid: set "
                    "rounding='nearest' and calibration='minmax' (the defaults)",
                    field="dtype",
                )

    def _check_grid_options(self, fmt: AnyFormat) -> None:
        if not self.narrow_range:
            if not (isinstance(fmt, IntFormat) and fmt.signed):
                raise SpecError(
                    f"narrow_range=False chooses the full symmetric range of a signed integer format "
                    f"(int2..int8); dtype={self.dtype!r} has no such choice: remove narrow_range "
                    "or use an intN dtype",
                    field="narrow_range",
                )
            if not self.symmetric:
                raise SpecError(
                    f"narrow_range=False applies to symmetric grids; dtype={self.dtype!r} with "
                    "symmetric=False already uses the full range [-2^(b-1), 2^(b-1)-1] with a zero "
                    "point: remove narrow_range, or set symmetric=True",
                    field="narrow_range",
                )
        if self.mx_scale_rounding != MXScaleRounding.FLOOR and not (
            isinstance(fmt, BlockFloatFormat) and fmt.is_mx
        ):
            raise SpecError(
                f"mx_scale_rounding={str(self.mx_scale_rounding)!r} chooses the shared power-of-two "
                f"exponent of an MX block (dtype 'mxfp8' or 'mxfp4'); dtype={self.dtype!r} has none: "
                "remove mx_scale_rounding",
                field="mx_scale_rounding",
            )

    @property
    def format(self) -> AnyFormat:
        """The typed format behind ``dtype``, with this spec's grid options: the full-range
        :class:`IntFormat` for ``narrow_range=False``, an MX format with ``mx_scale_rounding``."""
        fmt = parse_format(self.dtype)
        if isinstance(fmt, IntFormat) and fmt.narrow != self.narrow_range:
            return dataclasses.replace(fmt, narrow=self.narrow_range)
        if isinstance(fmt, BlockFloatFormat) and fmt.is_mx and fmt.scale_rounding != self.mx_scale_rounding:
            return dataclasses.replace(fmt, scale_rounding=MXScaleRounding(self.mx_scale_rounding))
        return fmt

    @property
    def affine_format(self) -> AffineFormat:
        """The format, for the scale-based paths; k-means formats are refused with a clear error."""
        fmt = self.format
        if isinstance(fmt, CodebookFormat):
            raise ValueError(
                f"dtype={self.dtype!r} has a codebook, not a scale and zero point; use "
                "qjax.quantize / qjax.fake_quant(estimator='ste'), which run k-means"
            )
        return fmt

    @property
    def bits(self) -> float:
        """Bits of one value as the format defines it (not counting scales)."""
        fmt = self.format
        if isinstance(fmt, IntFormat | CodebookFormat):
            return float(fmt.bits)
        return float(fmt.container_bits)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        """Build a spec from a config file's mapping; an unknown key is named with a suggestion
        (:class:`~qjax.numerics.fields.SpecError` with ``field`` the unknown key)."""
        if not isinstance(d, Mapping):
            raise SpecTypeError(f"a QuantSpec needs a mapping of its fields; got {type(d).__name__}")
        reject_unknown_fields("QuantSpec", d, [f.name for f in dataclasses.fields(cls)])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-friendly values (strings, ints, lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out
