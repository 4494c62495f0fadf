"""The Pallas launch every tiled matmul kernel of qjax shares: grid, K ranges, masked rows, the call.

A kernel's output is tiled into ``(block_m, block_n)`` blocks; the third grid axis walks K.

* **GPU body** (Triton; also what the interpreter runs): grid ``(M blocks, N blocks, K ranges)``.
  Each program holds a ``(block_m, K)`` row panel of ``x`` and all of K of its weight columns, and
  walks its range of K steps in a ``fori_loop`` (:class:`KRanges`). ``x`` is not padded to the M
  block: the rows of the last block past M load as zeros and are not stored (:func:`load_rows`,
  :func:`store_rows`), so decode (M = 1 in a 16-row block) reads and writes one row. When the
  ``(M, N)`` grid is too small to fill the GPU, K is split into ranges (:func:`split_k_ranges`)
  whose raw partial sums XLA adds up before the kernel's epilogue.
* **TPU body** (Mosaic): grid ``(M blocks, N blocks, K steps)``, K last and ``"arbitrary"``; ``x``
  padded to the blocks; a VMEM accumulator zeroed at the first K step and finished at the last.

A driver plans the grid (:func:`plan_grid`), lists its operands with their BlockSpecs (the spec
helpers of :class:`Grid` and of :class:`~qjax.kernels.common.WeightLayout`) and calls
:func:`launch`, which runs the ``pallas_call`` and returns ``(M, N)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypedDict

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qjax.kernels.backend import Backend, Body
from qjax.kernels.common import pad_axis, round_up
from qjax.kernels.tuning import Blocks


class LaunchOptions(TypedDict, total=False):
    """How a matmul kernel is launched (keyword arguments of every tiled matmul kernel).

    ``blocks``: overrides of the block table (:func:`qjax.kernels.tuning.choose_blocks`);
    ``backend``: ``"gpu"``, ``"tpu"``, ``"interpret"`` or ``None`` (the default device's);
    ``split_k``: K ranges of the GPU body (:func:`plan_grid`; ``None``: enough to fill the GPU on
    ``"gpu"``, else one); ``body``: ``"gpu"`` or ``"tpu"``, which body the interpreter runs (tests)."""

    blocks: Blocks | Mapping[str, int] | None
    backend: Backend | str | None
    split_k: int | None
    body: Body | str | None


LAUNCH_KEYS = tuple(LaunchOptions.__annotations__)


def split_launch_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], LaunchOptions]:
    """A kernel's keyword arguments as ``(the others, its LaunchOptions)``."""
    launch = LaunchOptions(**{k: v for k, v in options.items() if k in LAUNCH_KEYS})  # type: ignore[typeddict-item]
    return {k: v for k, v in options.items() if k not in LAUNCH_KEYS}, launch


GPU_TARGET_PROGRAMS = 256  # a few waves of an H100's 132 SMs: below this, split K over programs
SEMANTICS = ("parallel", "parallel", "arbitrary")  # M and N blocks in parallel, K in order


def split_k_ranges(programs: int, steps: int, split_k: int | None = None) -> tuple[int, int]:
    """``(ranges, steps per range)`` of a K loop of ``steps`` steps run by ``programs`` (M x N blocks).

    ``split_k=None`` picks a power of two of ranges, each of >= 2 steps, so that about
    :data:`GPU_TARGET_PROGRAMS` programs run; an int asks for that many ranges. Ranges hold
    ``ceil(steps / ranges)`` steps, the last one the rest, so the count returned may be smaller than
    asked (10 steps in 4 ranges is 3 + 3 + 3 + 1; 9 steps in 4 is 3 + 3 + 3, three ranges)."""
    if split_k is None:
        want = 1 << (max(1, -(-GPU_TARGET_PROGRAMS // programs)) - 1).bit_length()
        split_k = max(1, min(want, steps // 2))
    elif not 1 <= split_k <= steps:
        raise ValueError(f"split_k={split_k}: must be between 1 and the {steps} K steps of the kernel")
    per = -(-steps // split_k)
    return -(-steps // per), per


class KRanges(NamedTuple):
    """What a body knows of its K loop: ``steps`` steps per program (GPU: its K range, from step
    ``program_id(2) * steps``; TPU: one step per program), ``total`` steps in all, and the ``rows``
    (M) of ``x`` and the output."""

    steps: int
    total: int
    rows: int

    def step_of(self) -> Callable[[Any], tuple[jax.Array, jax.Array | None]]:
        """This GPU program's K range as a function of a step of the range returning ``(t, keep)``:
        the step of the whole K loop, and ``None`` when every range is full, else a 0 / 1 float32
        factor for the partial sum: the last range, if shorter, repeats the last step (``t`` clamped,
        so every load stays in bounds) with ``keep`` = 0. Call it outside the loop."""
        first = pl.program_id(2) * self.steps
        steps, total = self.steps, self.total

        def step_of(step: Any) -> tuple[jax.Array, jax.Array | None]:
            t = first + step
            if total % steps == 0:
                return t, None
            return jnp.minimum(t, total - 1), (t < total).astype(jnp.float32)

        return step_of


def row_mask(shape: tuple[int, ...], block_m: int, rows: int) -> jax.Array:
    """Which elements of a block of ``shape`` (rows on axis -2) of M block ``program_id(0)`` lie in
    the first ``rows`` rows of the whole array."""
    first = pl.program_id(0) * block_m
    return first + jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 2) < rows


def load_rows(ref: Any, rows: int, block_m: int, mask: jax.Array | None = None) -> jax.Array:
    """``ref[...]`` of a block of ``block_m`` rows (axis -2) of an array of ``rows`` rows: zeros past
    them when ``rows`` is not a multiple of ``block_m`` (a masked load). ``mask``: :func:`row_mask`
    of the block's shape, if already built (e.g. once outside a loop over K slices)."""
    if rows % block_m == 0:
        return ref[...]
    from jax.experimental.pallas import triton as pltriton

    mask = row_mask(tuple(ref.shape), block_m, rows) if mask is None else mask
    return pltriton.load(ref, mask=mask, other=jnp.zeros((), ref.dtype))  # zero of the ref's type (fp8 too)


def store_rows(o_ref: Any, value: jax.Array, rows: int) -> None:
    """``o_ref[...] = value`` for the rows of the block that exist (the output has ``rows`` rows;
    its last block may run past them)."""
    bm = o_ref.shape[-2]
    if rows % bm == 0:
        o_ref[...] = value
        return
    from jax.experimental.pallas import triton as pltriton

    pltriton.store(o_ref, value, mask=row_mask(tuple(o_ref.shape), bm, rows))


def compiler_params(backend: Backend, blocks: Blocks, dimension_semantics: tuple[str, ...]) -> Any:
    """Pallas ``compiler_params`` for ``backend``: Triton's (warps, stages), Mosaic's (dimension
    semantics: ``"parallel"`` or ``"arbitrary"`` per grid axis), none for the interpreter."""
    if backend == Backend.GPU:
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    if backend == Backend.TPU:
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=dimension_semantics)  # type: ignore[arg-type]
    return None


@dataclasses.dataclass(frozen=True)
class Grid:
    """The grid of one launch: ``m`` rows of ``x``, ``n_pad`` weight columns, ``k_steps`` K steps;
    on the GPU body ``split`` K ranges of ``per`` steps (the last may be shorter)."""

    body: Body
    backend: Backend
    blocks: Blocks
    m: int
    n_pad: int
    k_steps: int
    split: int = 1
    per: int = 1

    @property
    def fused(self) -> bool:
        """Whether the kernel finishes the output (no K split): its epilogue runs in the kernel."""
        return self.split == 1

    @property
    def ranges(self) -> KRanges:
        if self.body == Body.GPU:
            return KRanges(self.per, self.k_steps, self.m)
        return KRanges(1, self.k_steps, round_up(self.m, self.blocks.block_m))

    @property
    def shape(self) -> tuple[int, int, int]:
        bm, bn = self.blocks.block_m, self.blocks.block_n
        return (-(-self.m // bm), self.n_pad // bn, self.split if self.body == Body.GPU else self.k_steps)

    def pad_rows(self, a: jax.Array) -> jax.Array:
        """A row operand (axis 0 over M) as the body reads it: padded to the M block on TPU, as it
        is on GPU (masked rows)."""
        return pad_axis(a, 0, self.blocks.block_m) if self.body == Body.TPU else a

    def x_spec(self, kp: int, block_k: int) -> Any:
        """``x``'s block: a ``(block_m, kp)`` row panel (GPU), a ``(block_m, block_k)`` tile (TPU)."""
        bm = self.blocks.block_m
        if self.body == Body.GPU:
            return pl.BlockSpec((bm, kp), lambda i, j, s: (i, 0))
        return pl.BlockSpec((bm, block_k), lambda i, j, k: (i, k))

    def rows_spec(self, cols: int) -> Any:
        """``(block_m, cols)`` of a row operand (per-token scales: one value, or one per K group)."""
        return pl.BlockSpec((self.blocks.block_m, cols), lambda i, j, k: (i, 0))

    def columns_spec(self, rows: int) -> Any:
        """``(rows, block_n)`` of a column operand (per-column scales, bias, weight panels)."""
        return pl.BlockSpec((rows, self.blocks.block_n), lambda i, j, k: (0, j))


def plan_grid(
    body: Body, backend: Backend, blocks: Blocks, *, m: int, n_pad: int, k_steps: int, split_k: int | None
) -> Grid:
    """The grid of a launch. ``split_k`` (GPU body only): K ranges, or ``None``: enough to fill the
    GPU on ``"gpu"`` (:func:`split_k_ranges`), one on the interpreter."""
    if body == Body.TPU:
        if split_k not in (None, 1):
            raise ValueError(f"split_k={split_k}: K is split on GPU (Triton) only; the TPU body takes none")
        return Grid(body, backend, blocks, m, n_pad, k_steps)
    programs = -(-m // blocks.block_m) * (n_pad // blocks.block_n)
    split, per = split_k_ranges(
        programs, k_steps, 1 if split_k is None and backend != Backend.GPU else split_k
    )
    return Grid(body, backend, blocks, m, n_pad, k_steps, split, per)


def launch(
    grid: Grid,
    kernel: Callable[..., None],
    operands: Sequence[jax.Array],
    in_specs: Sequence[Any],
    *,
    n: int,
    out_dtype: Any,
    name: str,
    acc_dtype: Any = jnp.float32,
    finish: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Run ``kernel`` (called with ``ranges=grid.ranges``) on ``grid`` and return ``(M, n)``.

    The GPU body writes the output ``(M, N_pad)`` of ``out_dtype``, or with K split the raw partial
    sums ``(ranges, M, N_pad)`` of ``acc_dtype``: their real columns are summed by XLA and
    ``finish`` (the epilogue the kernel did not run) applied. The TPU body writes ``(M_pad, N_pad)``
    from a VMEM accumulator of ``acc_dtype`` (its last operand)."""
    bm, bn = grid.blocks.block_m, grid.blocks.block_n
    scratch: list[Any] = []
    if grid.body == Body.TPU:
        from jax.experimental.pallas import tpu as pltpu

        out_shape = jax.ShapeDtypeStruct((round_up(grid.m, bm), grid.n_pad), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, k: (i, j))
        scratch = [pltpu.VMEM((bm, bn), acc_dtype)]
    elif grid.fused:
        out_shape = jax.ShapeDtypeStruct((grid.m, grid.n_pad), out_dtype)  # the last M block masked
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((grid.split, grid.m, grid.n_pad), acc_dtype)
        out_spec = pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        functools.partial(kernel, ranges=grid.ranges),
        out_shape=out_shape,
        grid=grid.shape,
        in_specs=list(in_specs),
        out_specs=out_spec,
        scratch_shapes=scratch,
        compiler_params=compiler_params(grid.backend, grid.blocks, SEMANTICS),
        interpret=grid.backend == Backend.INTERPRET,
        name=name,
    )(*operands)
    if grid.body == Body.TPU or grid.fused:
        return out[: grid.m, :n]
    # the real rows and columns of the partial sums only (the kernel wrote no others)
    total = out[:, :, :n].sum(axis=0)
    return total if finish is None else finish(total)
