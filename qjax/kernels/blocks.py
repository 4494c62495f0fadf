"""What every Pallas kernel of qjax shares: the backend it is built for, its block sizes and padding.

**Backend.** A kernel is built for one of ``"gpu"`` (Pallas on Triton, chosen explicitly through
``jax.experimental.pallas.triton.CompilerParams``), ``"tpu"`` (Pallas on Mosaic) or ``"interpret"``
(the Pallas interpreter: any device, used on CPU and in the tests); W8A8 and FP8 also have
``"mosaic_gpu"``, the Hopper path of :mod:`qjax.kernels.hopper` (never the default).
:func:`resolve_backend` maps the ``backend=`` argument of a kernel (``None`` = the default
device's platform) to one of these; ``"cuda"``/``"rocm"`` are aliases of ``"gpu"``. Lowering for
a platform other than the host's, e.g. ``jax.jit(f).trace(*args).lower(lowering_platforms=
("cuda",))`` on a CPU machine, needs ``backend=`` named explicitly, since the default would be the
host's.

**Blocks.** :data:`BLOCK_TABLE` holds block sizes ``(block_m, block_n, block_k)`` per kernel and
backend, keyed by the smallest M bucket that holds the problem's M (small M: decode; large M:
prefill), and per device family where one was measured: ``(kernel, backend, family)`` entries
(:func:`device_family` of jax's ``device_kind``, e.g. ``"hopper"`` for an H100 or H200) take
precedence over ``(kernel, backend)`` on that family's devices. :func:`choose_blocks` reads it
(the family of the default device when the kernel is built for it; none when lowering for another
platform, unless ``device_kind=`` is given); a kernel's ``blocks=`` argument (a :class:`Blocks` or a
mapping with any of its fields) overrides it, and :func:`set_blocks` changes the table for a
session. TPU tiles respect Mosaic's (8, 128) layout: ``block_m`` a multiple of 8 (32 for int8
operands), ``block_n`` and ``block_k`` multiples of 128. Triton's ``dot`` needs every block
dimension >= 16.

**Padding.** Problems whose M, N or K are not multiples of the blocks are zero-padded up to them by
:func:`pad_axis` and the output sliced back: zeros contribute nothing to a contraction. Weights are
padded once, when they are packed for a kernel, so that a call pads only the (small) activations.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

BACKENDS = ("gpu", "tpu", "interpret", "mosaic_gpu")
_ALIASES = {
    "mosaic_gpu": "mosaic_gpu",
    "cuda": "gpu",
    "rocm": "gpu",
    "gpu": "gpu",
    "tpu": "tpu",
    "interpret": "interpret",
    "cpu": "interpret",
}


def resolve_backend(backend: str | None = None) -> str:
    """``"gpu"``, ``"tpu"`` or ``"interpret"`` for ``backend`` (``None``: the default device's)."""
    name = jax.default_backend() if backend is None else backend
    if name not in _ALIASES:
        raise ValueError(
            f"backend={backend!r} is not one of {sorted(_ALIASES)}; pass 'gpu' (Triton), 'tpu' "
            "(Mosaic) or 'interpret' (the Pallas interpreter, any device), or None for the default device"
        )
    return _ALIASES[name]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block sizes of a tiled matmul kernel and, for Triton, its launch parameters."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Blocks.{name}={value!r}: expected a positive integer")


# Device kind substrings (jax's Device.device_kind, e.g. "NVIDIA H100 80GB HBM3") -> device family,
# the third part of device-specific BLOCK_TABLE keys.
DEVICE_FAMILIES: dict[str, tuple[str, ...]] = {"hopper": ("H100", "H200", "H800", "H20", "GH200")}

# (kernel, backend) or (kernel, backend, device family) -> ((largest M of the bucket, Blocks), ...) in
# increasing M; the last bucket has no upper bound. (kernel, backend) entries are untuned starting
# points; family entries were measured on the machines named in docs/benchmarks/. Override per call
# with blocks= or per session with set_blocks().
_INF = 1 << 62
BLOCK_TABLE: dict[tuple[str, ...], tuple[tuple[int, Blocks], ...]] = {
    ("w8a8", "gpu"): (
        (16, Blocks(16, 128, 128, num_warps=4, num_stages=4)),
        (64, Blocks(64, 128, 128, num_warps=4, num_stages=4)),
        (_INF, Blocks(128, 128, 128, num_warps=8, num_stages=3)),
    ),
    # M <= 16 and > 64: the best of experiments.kernels.tune on an H100 (K = N = 4096)
    ("w8a8", "gpu", "hopper"): (
        (16, Blocks(16, 64, 128, num_warps=4, num_stages=4)),
        (64, Blocks(64, 128, 128, num_warps=4, num_stages=4)),
        (_INF, Blocks(256, 128, 64, num_warps=8, num_stages=3)),
    ),
    ("w8a8", "tpu"): ((32, Blocks(32, 256, 512)), (_INF, Blocks(256, 256, 512))),
    ("w8a8", "interpret"): ((_INF, Blocks(32, 128, 128)),),
    ("fp8", "gpu"): (
        (16, Blocks(16, 128, 128, num_warps=4, num_stages=4)),
        (64, Blocks(64, 128, 128, num_warps=4, num_stages=4)),
        (_INF, Blocks(128, 128, 128, num_warps=8, num_stages=3)),
    ),
    ("fp8", "gpu", "hopper"): (  # as for w8a8
        (16, Blocks(16, 64, 128, num_warps=4, num_stages=4)),
        (64, Blocks(64, 128, 128, num_warps=4, num_stages=4)),
        (_INF, Blocks(128, 256, 64, num_warps=8, num_stages=3)),
    ),
    ("fp8", "tpu"): ((32, Blocks(32, 256, 512)), (_INF, Blocks(256, 256, 512))),
    ("fp8", "interpret"): ((_INF, Blocks(32, 128, 128)),),
    ("w4a16", "gpu"): (
        (16, Blocks(16, 64, 128, num_warps=4, num_stages=4)),
        (64, Blocks(64, 64, 128, num_warps=4, num_stages=4)),
        (_INF, Blocks(128, 128, 128, num_warps=8, num_stages=3)),
    ),
    ("w4a16", "gpu", "hopper"): (
        (16, Blocks(16, 128, 256, num_warps=4, num_stages=3)),  # best of a block sweep on an H100
        (64, Blocks(64, 64, 128, num_warps=4, num_stages=4)),
        (_INF, Blocks(128, 128, 128, num_warps=8, num_stages=3)),
    ),
    ("w4a16", "tpu"): ((32, Blocks(32, 256, 512)), (_INF, Blocks(256, 256, 512))),
    ("w4a16", "interpret"): ((_INF, Blocks(32, 128, 128)),),
    # one row a program up to M = 64 (decode: a 16-row block was one program, one SM, walking all of
    # K; on an H100 it took 32 us at M = 1 and 84 us at M = 16 for K = 28672), 16 rows above
    ("act_quant", "gpu"): (
        (64, Blocks(1, 1, 1, num_warps=4, num_stages=1)),
        (_INF, Blocks(16, 1, 1, num_warps=4, num_stages=1)),
    ),
    ("act_quant", "tpu"): ((_INF, Blocks(32, 1, 1)),),
    ("act_quant", "interpret"): ((_INF, Blocks(32, 1, 1)),),
}


def device_family(device_kind: str | None) -> str | None:
    """The :data:`DEVICE_FAMILIES` family of a jax ``device_kind`` (``None`` if it has none)."""
    if not device_kind:
        return None
    return next((f for f, names in DEVICE_FAMILIES.items() if any(n in device_kind for n in names)), None)


def _default_device_kind(backend: str) -> str | None:
    """The default device's kind if a kernel for ``backend`` runs on it (not when lowering for
    another platform)."""
    platform = {"gpu": "gpu", "mosaic_gpu": "gpu", "tpu": "tpu"}.get(backend)
    if platform is None or jax.default_backend() != platform:
        return None
    return jax.devices()[0].device_kind


def table_key(kernel: str, backend: str, device_kind: str | None = None) -> tuple[str, ...]:
    """The :data:`BLOCK_TABLE` key :func:`choose_blocks` reads: the device family's entry if there
    is one, else ``(kernel, backend)``. ``device_kind`` defaults to the default device's."""
    backend = resolve_backend(backend)
    family = device_family(device_kind if device_kind is not None else _default_device_kind(backend))
    if family is not None and (kernel, backend, family) in BLOCK_TABLE:
        return (kernel, backend, family)
    return (kernel, backend)


def choose_blocks(
    kernel: str,
    backend: str,
    m: int,
    blocks: Blocks | Mapping[str, Any] | None = None,
    *,
    device_kind: str | None = None,
) -> Blocks:
    """The table's blocks for ``kernel`` on ``backend`` at ``m`` rows (the entry of the device's
    family if the table has one, see :func:`table_key`), with ``blocks`` over them."""
    key = table_key(kernel, backend, device_kind)
    if key not in BLOCK_TABLE:
        kernels = sorted({k[0] for k in BLOCK_TABLE if k[1] == key[1]})
        raise ValueError(
            f"kernel {kernel!r} has no {key[1]!r} backend (kernels there: {kernels}); "
            "use backend='gpu' (Triton), 'tpu' or 'interpret'"
        )
    chosen = next(b for limit, b in BLOCK_TABLE[key] if m <= limit)
    if blocks is None:
        return chosen
    if isinstance(blocks, Blocks):
        return blocks
    unknown = set(blocks) - {f.name for f in dataclasses.fields(Blocks)}
    if unknown:
        raise ValueError(
            f"blocks: unknown fields {sorted(unknown)}; fields of Blocks: "
            f"{[f.name for f in dataclasses.fields(Blocks)]}"
        )
    return dataclasses.replace(chosen, **dict(blocks))


def set_blocks(
    kernel: str, backend: str, table: tuple[tuple[int, Blocks], ...], *, family: str | None = None
) -> None:
    """Replace the table entry of ``kernel`` on ``backend`` (buckets ``(largest m, Blocks)``), or
    with ``family`` (a key of :data:`DEVICE_FAMILIES`) the entry for that device family only."""
    if not table or any(a[0] >= b[0] for a, b in itertools.pairwise(table)):
        raise ValueError("table: expected a non-empty tuple of (largest m, Blocks) in increasing m")
    if family is not None and family not in DEVICE_FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {sorted(DEVICE_FAMILIES)} or None")
    key = (kernel, resolve_backend(backend)) + (() if family is None else (family,))
    BLOCK_TABLE[key] = (*table[:-1], (_INF, table[-1][1]))


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, multiple: int, value: Any = 0) -> jax.Array:
    """``x`` zero-padded (or ``value``-padded) at the end of ``axis`` to a multiple of ``multiple``."""
    size = x.shape[axis]
    extra = round_up(size, multiple) - size
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def compiler_params(backend: str, blocks: Blocks, dimension_semantics: tuple[str, ...]) -> Any:
    """Pallas ``compiler_params`` for ``backend``: Triton's (warps, stages), Mosaic's (dimension
    semantics: ``"parallel"`` or ``"arbitrary"`` per grid axis), none for the interpreter."""
    backend = resolve_backend(backend)
    if backend == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=dimension_semantics)  # type: ignore[arg-type]
    return None


# --------------------------------------------------------------------------------------------------
# What the GPU (Triton) bodies share: rows of M not padded to the block, K split over programs

GPU_TARGET_PROGRAMS = 256  # a few waves of an H100's 132 SMs: below this, split K over programs


def split_k_ranges(programs: int, steps: int, split_k: int | None = None) -> tuple[int, int]:
    """``(ranges, steps per range)`` of a K loop of ``steps`` steps run by ``programs`` (M x N blocks).

    ``split_k=None`` picks a power of two of ranges, each of >= 2 steps, so that about
    :data:`GPU_TARGET_PROGRAMS` programs run (decode with a narrow N or a long K leaves SMs idle
    otherwise); an int asks for that many ranges. Ranges hold ``ceil(steps / ranges)`` steps, the
    last one the rest, so the count returned may be smaller than asked (10 steps in 4 ranges is
    3 + 3 + 3 + 1; 9 steps in 4 is 3 + 3 + 3, three ranges)."""
    if split_k is None:
        want = 1 << (max(1, -(-GPU_TARGET_PROGRAMS // programs)) - 1).bit_length()
        split_k = max(1, min(want, steps // 2))
    elif not 1 <= split_k <= steps:
        raise ValueError(f"split_k={split_k}: must be between 1 and the {steps} K steps of the kernel")
    per = -(-steps // split_k)
    return -(-steps // per), per


def k_range(steps: int, total_steps: int) -> Any:
    """This program's K range (ranges of ``steps`` steps, program ``program_id(2)``), as a function
    of a step of the range returning ``(t, keep)``: the step of the whole K loop, and ``None`` when
    every range is full, else a 0 / 1 float32 factor for the partial sum: the last range, if
    shorter, repeats the last step (``t`` clamped, so every load stays in bounds) with ``keep`` = 0.
    Call it outside the loop (the program id is read once)."""
    from jax.experimental import pallas as pl

    first = pl.program_id(2) * steps

    def step_of(step: Any) -> tuple[jax.Array, jax.Array | None]:
        t = first + step
        if total_steps % steps == 0:
            return t, None
        return jnp.minimum(t, total_steps - 1), (t < total_steps).astype(jnp.float32)

    return step_of


def row_mask(shape: tuple[int, ...], block_m: int, rows: int) -> jax.Array:
    """Which elements of a block of ``shape`` (rows on axis -2) of M block ``program_id(0)`` lie in
    the first ``rows`` rows of the whole array."""
    from jax.experimental import pallas as pl

    first = pl.program_id(0) * block_m
    return first + jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 2) < rows


def load_rows(ref: Any, rows: int, block_m: int, mask: jax.Array | None = None) -> jax.Array:
    """``ref[...]`` of a block of ``block_m`` rows (axis -2) of an array of ``rows`` rows: zeros past
    them when ``rows`` is not a multiple of ``block_m`` (a masked load, so the array need not be
    padded to the block). ``mask``: :func:`row_mask` of the block's shape, if already built (e.g.
    once outside a loop over K slices)."""
    if rows % block_m == 0:
        return ref[...]
    from jax.experimental.pallas import triton as pltriton

    mask = row_mask(tuple(ref.shape), block_m, rows) if mask is None else mask
    return pltriton.load(ref, mask=mask, other=jnp.zeros((), ref.dtype))  # zero of the ref's type (fp8 too)


def store_rows(o_ref: Any, value: jax.Array, rows: int) -> None:
    """``o_ref[...] = value`` for the rows of the block that exist: the output has ``rows`` (M) rows,
    its last block of ``block_m`` rows may run past them (GPU grid axis 0 over M blocks)."""
    bm = o_ref.shape[-2]
    if rows % bm == 0:
        o_ref[...] = value
        return
    from jax.experimental.pallas import triton as pltriton

    pltriton.store(o_ref, value, mask=row_mask(tuple(o_ref.shape), bm, rows))
