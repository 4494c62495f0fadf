"""Block sizes of the Pallas kernels: the table by kernel, backend, M bucket and device family.

:data:`BLOCK_TABLE` holds :class:`Blocks` ``(block_m, block_n, block_k)`` (and Triton's warps and
stages) per ``(kernel, backend)``, keyed by the smallest M bucket that holds the problem's M (small
M: decode; large M: prefill). ``(kernel, backend, family)`` entries (:func:`device_family` of jax's
``device_kind``, e.g. ``"hopper"`` for an H100 or H200) take precedence on that family's devices;
they were measured (``docs/benchmarks/``), the others are starting points. :func:`choose_blocks`
reads the table (the default device's family when the kernel is built for it, none when lowering for
another platform unless ``device_kind=`` is given); a kernel's ``blocks=`` (a :class:`Blocks` or a
mapping of some of its fields) overrides it, and :func:`set_blocks` changes it for a session.

TPU tiles respect Mosaic's (8, 128) layout: ``block_m`` a multiple of 8 (32 for 8-bit operands),
``block_n`` and ``block_k`` multiples of 128. Triton's ``dot`` needs every block dimension >= 16.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

import jax

from qjax.kernels.backend import Backend, resolve_backend


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

Buckets = tuple[tuple[int, Blocks], ...]  # (largest M of the bucket, Blocks) in increasing M
_INF = 1 << 62  # the last bucket has no upper bound
_GPU: Buckets = (
    (16, Blocks(16, 128, 128, num_warps=4, num_stages=4)),
    (64, Blocks(64, 128, 128, num_warps=4, num_stages=4)),
    (_INF, Blocks(128, 128, 128, num_warps=8, num_stages=3)),
)
_TPU: Buckets = ((32, Blocks(32, 256, 512)), (_INF, Blocks(256, 256, 512)))
_INTERPRET: Buckets = ((_INF, Blocks(32, 128, 128)),)
_HOPPER_SMALL_M = (  # W8A8 and FP8 on Hopper GPUs at M <= 64 (experiments.kernels.tune)
    (16, Blocks(16, 64, 128, num_warps=4, num_stages=4)),
    (64, Blocks(64, 128, 128, num_warps=4, num_stages=4)),
)

# (kernel, backend) or (kernel, backend, device family) -> buckets. Override per call with blocks=
# or per session with set_blocks().
BLOCK_TABLE: dict[tuple[str, ...], Buckets] = {
    ("w8a8", "gpu"): _GPU,
    ("w8a8", "gpu", "hopper"): (*_HOPPER_SMALL_M, (_INF, Blocks(256, 128, 64, num_warps=8, num_stages=3))),
    ("w8a8", "tpu"): _TPU,
    ("w8a8", "interpret"): _INTERPRET,
    ("fp8", "gpu"): _GPU,
    ("fp8", "gpu", "hopper"): (*_HOPPER_SMALL_M, (_INF, Blocks(128, 256, 64, num_warps=8, num_stages=3))),
    ("fp8", "tpu"): _TPU,
    ("fp8", "interpret"): _INTERPRET,
    ("w4a16", "gpu"): (
        (16, Blocks(16, 64, 128, num_warps=4, num_stages=4)),
        (64, Blocks(64, 64, 128, num_warps=4, num_stages=4)),
        (_INF, Blocks(128, 128, 128, num_warps=8, num_stages=3)),
    ),
    ("w4a16", "gpu", "hopper"): (
        (16, Blocks(16, 128, 256, num_warps=4, num_stages=3)),
        (64, Blocks(64, 64, 128, num_warps=4, num_stages=4)),
        (_INF, Blocks(128, 128, 128, num_warps=8, num_stages=3)),
    ),
    ("w4a16", "tpu"): _TPU,
    ("w4a16", "interpret"): _INTERPRET,
    # one row a program up to M = 64 (at decode a 16-row block was one program walking all of K),
    # 16 rows above
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


def default_device_kind(backend: Backend) -> str | None:
    """The default device's kind if a kernel for ``backend`` runs on it (not when lowering for
    another platform, and not on the interpreter)."""
    if backend == Backend.INTERPRET or jax.default_backend() != backend.value:
        return None
    return jax.devices()[0].device_kind


def table_key(kernel: str, backend: Backend | str, device_kind: str | None = None) -> tuple[str, ...]:
    """The :data:`BLOCK_TABLE` key :func:`choose_blocks` reads: the device family's entry if there
    is one, else ``(kernel, backend)``. ``device_kind`` defaults to the default device's."""
    be = resolve_backend(backend)
    family = device_family(device_kind if device_kind is not None else default_device_kind(be))
    if family is not None and (kernel, be, family) in BLOCK_TABLE:
        return (kernel, be.value, family)
    return (kernel, be.value)


def choose_blocks(
    kernel: str,
    backend: Backend | str,
    m: int,
    blocks: Blocks | Mapping[str, int] | None = None,
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
    if not isinstance(blocks, Mapping):
        raise TypeError(f"blocks={blocks!r}: expected a Blocks, a mapping of some of its fields, or None")
    fields = [f.name for f in dataclasses.fields(Blocks)]
    unknown = set(blocks) - set(fields)
    if unknown:
        raise ValueError(f"blocks: unknown fields {sorted(unknown)}; fields of Blocks: {fields}")
    return dataclasses.replace(chosen, **dict(blocks))


def set_blocks(kernel: str, backend: Backend | str, table: Buckets, *, family: str | None = None) -> None:
    """Replace the table entry of ``kernel`` on ``backend`` (buckets ``(largest m, Blocks)``), or
    with ``family`` (a key of :data:`DEVICE_FAMILIES`) the entry for that device family only."""
    if not table or any(a[0] >= b[0] for a, b in itertools.pairwise(table)):
        raise ValueError("table: expected a non-empty tuple of (largest m, Blocks) in increasing m")
    if family is not None and family not in DEVICE_FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {sorted(DEVICE_FAMILIES)} or None")
    key = (kernel, resolve_backend(backend).value) + (() if family is None else (family,))
    BLOCK_TABLE[key] = (*table[:-1], (_INF, table[-1][1]))
