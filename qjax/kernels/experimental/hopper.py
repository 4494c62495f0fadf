"""Experimental: W8A8 and FP8 on Hopper (sm_90): Pallas on Mosaic GPU (TMA, ``wgmma``, warp
specialisation).

.. math::

    y_{mn} = s^x_m \\, s^w_n \\Big(\\sum_k q^x_{mk} q^w_{kn} - z^x_m \\sum_k q^w_{kn}\\Big) + b_n

the contraction and epilogue of :func:`qjax.kernels.w8a8.w8a8_matmul` (int8, int32 accumulator) and
:func:`qjax.kernels.fp8.fp8_matmul` (e4m3, float32 accumulator): :func:`w8a8_matmul_hopper`,
:func:`int8_matmul_hopper`, :func:`fp8_matmul_hopper`, and the ``mosaic_gpu`` serving path.

**Layout.** Hopper's 8-bit ``wgmma`` reads both operands K-major, so the kernel takes the weight
``(N, K)``, padded to the tiles (:func:`prepare_weight`, once per weight; a ``(K, N)`` weight is
transposed on each call).

**Schedule.** One CTA per SM walks the output tiles (persistent, along a snake of ``grid_tile_width``
columns for L2 reuse). A CTA tile is ``(tile_m, 2 * tile_n)``: two compute warpgroups, one
``(tile_m, tile_n)`` half each, with a register accumulator, and one memory warpgroup that keeps
``max_concurrent_steps`` K slices of ``x`` and ``w`` in flight through TMA. The epilogue (zero-point
correction, scales, bias, cast) runs on the accumulator in registers; the tile leaves through shared
memory by TMA. M and N are padded to the CTA tile and K to ``tile_k`` (zeros add nothing).

On CPU the kernel runs in Pallas' GPU interpreter (:func:`interpret_params`); where that cannot
read the transposed shared-memory views of 8-bit ``wgmma`` (:data:`INTERPRETS_8BIT`) only the
kernel's 16-bit variant (weight read ``(K, N)``) is interpreted. Status and checks:
``docs/benchmarks/kernels_status.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qjax.kernels.common import KN, WeightLayout, pad_axis, round_up
from qjax.kernels.fp8 import check_fp8
from qjax.kernels.w8a8 import check_int8, check_w8a8

_ROW = ("x_scale", "x_zp")  # (M,) vectors; the rest are (N,) vectors
_INT = ("x_zp", "colsum")  # int32, carried bit for bit in the float32 tables
_ORDER = ("x_scale", "w_scale", "x_zp", "colsum", "bias")
H100_SMS = 132  # H100 SXM and H200: the persistent grid when lowering without a GPU at hand


@dataclasses.dataclass(frozen=True)
class HopperConfig:
    """Tiles of :func:`scaled_matmul_hopper`. ``tile_m`` is a multiple of 64 (wgmma's M),
    ``tile_n`` a multiple of 8 and at most 256 (one warpgroup's half of the CTA tile), ``tile_k``
    a multiple of 128 (one 128-byte swizzle of 8-bit values); ``max_concurrent_steps`` K slices
    are in flight; ``grid_tile_width`` output tiles side by side per snake column; ``epi_tile_n``
    columns leave per TMA store; ``max_ctas`` caps the persistent grid (tests)."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    max_concurrent_steps: int = 4
    grid_tile_width: int = 8
    epi_tile_n: int = 64
    max_ctas: int = 1 << 30  # at most one CTA per SM whatever this says

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"HopperConfig.{f.name}={v!r}: expected a positive integer")
        if self.tile_m % 64:
            raise ValueError(f"HopperConfig.tile_m={self.tile_m}: must be a multiple of 64 (wgmma's M)")
        if self.tile_n % 8 or self.tile_n > 256:
            raise ValueError(f"HopperConfig.tile_n={self.tile_n}: must be a multiple of 8 and <= 256")
        if self.tile_k % 128:
            raise ValueError(
                f"HopperConfig.tile_k={self.tile_k}: must be a multiple of 128 (8-bit swizzle width)"
            )
        if self.tile_n % self.epi_tile_n:
            raise ValueError(f"HopperConfig.epi_tile_n={self.epi_tile_n} must divide tile_n={self.tile_n}")


# M bucket -> config, like qjax.kernels.tuning.BLOCK_TABLE (starting points).
HOPPER_TABLE: tuple[tuple[int, HopperConfig], ...] = (
    (64, HopperConfig(tile_m=64, tile_n=128, tile_k=128, max_concurrent_steps=4)),
    (1 << 62, HopperConfig(tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=4)),
)


SMEM_BYTES = 232448  # the shared memory a CTA may use on sm_90 (227 KiB)


def smem_bytes(cfg: HopperConfig, k_iters: int, operand_bytes: int, out_bytes: int, depth: int) -> int:
    """Shared memory of one CTA: the K slices in flight, the output staging tiles, the tables of
    epilogue vectors (``depth`` rows of ``tile_m`` and of ``tile_n`` float32 per warpgroup) and a
    margin for barriers."""
    stages = min(cfg.max_concurrent_steps, k_iters)
    operands = stages * (cfg.tile_m + 2 * cfg.tile_n) * cfg.tile_k * operand_bytes
    staging = 2 * 2 * min(cfg.tile_m, 64) * cfg.epi_tile_n * out_bytes  # 2 warpgroups x 2 slots
    return operands + staging + 2 * depth * (cfg.tile_m + cfg.tile_n) * 4 + 1024


def choose_config(
    m: int,
    config: HopperConfig | Mapping[str, Any] | None = None,
    *,
    k_iters: int = 1 << 30,
    operand_bytes: int = 1,
    out_bytes: int = 2,
    depth: int = 0,
) -> HopperConfig:
    """The table's config for ``m`` rows, with ``config`` (a config or some of its fields) over it.
    A table entry that would not fit in shared memory (e.g. float32 output) keeps fewer K slices
    in flight; a config given by the caller that does not fit raises."""
    chosen = next(c for limit, c in HOPPER_TABLE if m <= limit)
    if config is None:
        while (
            smem_bytes(chosen, k_iters, operand_bytes, out_bytes, depth) > SMEM_BYTES
            and chosen.max_concurrent_steps > 2
        ):
            chosen = dataclasses.replace(chosen, max_concurrent_steps=chosen.max_concurrent_steps - 1)
    elif isinstance(config, HopperConfig):
        chosen = config
    elif not isinstance(config, Mapping):
        raise TypeError(
            f"config={config!r}: the Hopper kernels take a HopperConfig or a mapping of its fields"
        )
    else:
        fields = {f.name for f in dataclasses.fields(HopperConfig)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(
                f"config: unknown fields {sorted(unknown)}; fields of HopperConfig: {sorted(fields)}"
            )
        chosen = dataclasses.replace(chosen, **dict(config))
    need = smem_bytes(chosen, k_iters, operand_bytes, out_bytes, depth)
    if need > SMEM_BYTES:
        raise ValueError(
            f"{chosen} needs about {need} bytes of shared memory, more than the {SMEM_BYTES} of an "
            "sm_90 CTA; lower max_concurrent_steps, tile_k, tile_n or epi_tile_n"
        )
    return chosen


# Whether Pallas' GPU interpreter reads the transposed shared-memory views of 8-bit wgmma (the
# versions: docs/benchmarks/kernels_status.md).
INTERPRETS_8BIT = jax.__version_info__ >= (0, 11)


def interpret_params() -> Any:
    """The parameters of Pallas' GPU interpret mode (Mosaic GPU kernels run on the CPU)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def num_sms() -> int:
    """Streaming multiprocessors of the default GPU; an H100's 132 where there is no GPU."""
    dev = jax.devices()[0]
    if dev.platform == "gpu" and getattr(dev, "core_count", 0):
        return int(dev.core_count)
    return H100_SMS


def prepare_weight(
    w: jax.Array, config: HopperConfig | None = None, *, layout: WeightLayout = KN
) -> jax.Array:
    """``w`` (in ``layout``) as the kernel reads it: ``(N, K)``, padded to the tiles."""
    cfg = config or HOPPER_TABLE[-1][1]
    wt = w if layout.n_axis == 0 else jnp.transpose(w)  # (N, K)
    return pad_axis(pad_axis(wt, 0, 2 * cfg.tile_n), 1, cfg.tile_k)


def _kernel(
    x_gmem: Any,
    w_gmem: Any,
    *refs: Any,
    names: tuple[str, ...],
    cfg: HopperConfig,
    acc_dtype: Any,
    out_dtype: Any,
    w_kmajor: bool,
) -> None:
    # x_gmem (Mp, Kp); w_gmem (Np, Kp) if w_kmajor else (Kp, Np); refs: the row table (depth, Mp)
    # and/or the column table (depth, Np) of epilogue vectors, then out (Mp, Np)
    from jax.experimental.pallas import mosaic_gpu as plgpu

    *epi_gmem, out_gmem = refs
    mp, kp = x_gmem.shape
    np_ = w_gmem.shape[0] if w_kmajor else w_gmem.shape[1]
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_n = 2 * tn
    m_iters, n_iters, k_iters = mp // tm, np_ // cta_n, kp // tk
    bits = jnp.dtype(x_gmem.dtype).itemsize * 8

    def smem_transforms(minor: int) -> tuple[Any, ...]:
        swizzle = plgpu.find_swizzle(minor * bits, "operand tile")  # bytes of swizzle
        return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))

    if w_kmajor:  # w (N, K): K slices (cta_n, tk)
        w_spec = plgpu.BlockSpec(
            (cta_n, tk), lambda k: (0, k), transforms=smem_transforms(tk), memory_space=plgpu.SMEM
        )
    else:  # w (K, N): K slices (tk, cta_n), each warpgroup's half its own swizzled block
        w_spec = plgpu.BlockSpec(
            (tk, cta_n), lambda k: (k, 0), transforms=smem_transforms(tn), memory_space=plgpu.SMEM
        )
    out_bits = jnp.dtype(out_dtype).itemsize * 8
    out_swizzle = plgpu.find_swizzle(cfg.epi_tile_n * out_bits, "output")
    out_transforms = (
        plgpu.TilingTransform((8, out_swizzle * 8 // out_bits)),
        plgpu.SwizzleTransform(out_swizzle),
    )
    epi_m = min(tm, 64)

    def pipeline(body: Any, context: Any) -> Any:
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (tm, tk), lambda k: (0, k), transforms=smem_transforms(tk), memory_space=plgpu.SMEM
                ),
                w_spec,
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=context,
        )

    def ignore(*args: Any, **kwargs: Any) -> None:
        del args, kwargs

    rows = tuple(n for n in names if n in _ROW)
    cols = tuple(n for n in names if n not in _ROW)
    tables = tuple(t for t in (rows, cols) if t)  # one TMA copy per table and warpgroup
    # Both tables equally deep (the driver pads the shorter with zero rows): Pallas' GPU interpreter
    # hung on this kernel with tables of different depth on one barrier, and with four vectors
    # copied separately (docs/benchmarks/kernels_status.md).
    depth = max(len(rows), len(cols))
    vec_smem = tuple(plgpu.SMEM((2, depth, tm if t is rows else tn), jnp.float32) for t in tables)
    vec_barrier = plgpu.Barrier(num_arrivals=len(tables), num_barriers=2) if tables else None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, 2, epi_m, cfg.epi_tile_n), out_dtype, transforms=out_transforms),
        vec_smem=vec_smem,
        vec_barrier=vec_barrier,
        collective_axes="wg",
    )
    def _scope(allocs: Any, out_smem: Any, vec_smem: Any, vec_barrier: Any) -> None:
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info: Any) -> None:
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, cfg.grid_tile_width)
            m_sl = pl.ds(mi * tm, tm)
            n_start = ni * cta_n + wg * tn  # this warpgroup's half

            def context(run: Any) -> None:
                # The epilogue's vectors for this tile travel by TMA while the K loop runs.
                for i, (t, ref) in enumerate(zip(tables, epi_gmem, strict=True)):
                    src = ref.at[:, m_sl] if t is rows else ref.at[:, pl.ds(n_start, tn)]
                    plgpu.copy_gmem_to_smem(src, vec_smem[i].at[wg], vec_barrier.at[wg])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), acc_dtype))
                def _acc(acc_ref: Any) -> None:
                    run(acc_ref)
                    acc = acc_ref[...]  # (tm, tn)
                    vec = {}
                    if tables:
                        plgpu.barrier_wait(vec_barrier.at[wg])
                    for i, t in enumerate(tables):
                        for j, name in enumerate(t):
                            v = vec_smem[i][wg, j]
                            vec[name] = lax.bitcast_convert_type(v, jnp.int32) if name in _INT else v
                    y = _epilogue(acc, vec, out_dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    step = 0
                    for em in range(tm // epi_m):
                        for en in range(tn // cfg.epi_tile_n):
                            slot = step % 2
                            step += 1
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            out_smem[wg, slot] = y[
                                em * epi_m : (em + 1) * epi_m,
                                en * cfg.epi_tile_n : (en + 1) * cfg.epi_tile_n,
                            ]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                out_gmem.at[
                                    pl.ds(mi * tm + em * epi_m, epi_m),
                                    pl.ds(n_start + en * cfg.epi_tile_n, cfg.epi_tile_n),
                                ],
                            )

            def mma(idx: Any, x_smem: Any, w_smem: Any, acc_ref: Any) -> Any:
                del idx
                if w_kmajor:  # 8-bit: both operands K-major, the weight half read transposed
                    w_half = w_smem.at[pl.ds(wg * tn, tn)].transpose((1, 0))
                else:
                    w_half = w_smem.at[:, pl.ds(wg * tn, tn)]  # (tk, tn)
                plgpu.wgmma(acc_ref, x_smem, w_half)
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, context)(
                x_gmem.at[m_sl, :],
                w_gmem.at[pl.ds(ni * cta_n, cta_n), :]
                if w_kmajor
                else w_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
                allocations=allocs,
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _epilogue(acc: jax.Array, vec: Mapping[str, jax.Array], out_dtype: Any) -> jax.Array:
    """:func:`qjax.kernels.common.epilogue` on vectors: the same arithmetic in the same order."""
    shape = acc.shape

    def row(v: jax.Array) -> jax.Array:
        return lax.broadcast_in_dim(v, shape, (0,))

    def col(v: jax.Array) -> jax.Array:
        return lax.broadcast_in_dim(v, shape, (1,))

    if "x_zp" in vec:
        acc = acc - (row(vec["x_zp"]) * col(vec["colsum"])).astype(acc.dtype)  # int32 for int8
    if "x_scale" not in vec:
        return acc.astype(out_dtype)
    y = acc.astype(jnp.float32) * row(vec["x_scale"]) * col(vec["w_scale"])
    if "bias" in vec:
        y = y + col(vec["bias"])
    return y.astype(out_dtype)


def scaled_matmul_hopper(
    x: jax.Array,
    w: jax.Array,
    epilogue: Mapping[str, jax.Array],
    *,
    n: int,
    acc_dtype: Any,
    out_dtype: Any,
    config: HopperConfig | Mapping[str, Any] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``x`` ``(M, K)`` times the weight ``w`` with the epilogue of :mod:`qjax.kernels.common`;
    operands checked by the caller. 8-bit operands (int8, e4m3) take the weight K-major, ``(N', K')``
    (:func:`prepare_weight`); 16-bit operands take it ``(K', N')``; ``N' >= n``, ``K' >= K``, the
    padding zero. ``epilogue`` holds ``(M, 1)``/``(1, 1)`` row and ``(1, N)``/``(1, 1)`` column
    operands keyed by :data:`qjax.kernels.common.EPILOGUE_ORDER`. ``interpret`` runs Pallas' GPU
    interpreter (16-bit operands only unless :data:`INTERPRETS_8BIT`). Returns ``(M, n)``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = x.shape
    operand_bytes = jnp.dtype(x.dtype).itemsize
    kmajor = operand_bytes == 1
    n_axis, k_axis = (0, 1) if kmajor else (1, 0)
    if w.shape[k_axis] < k or w.shape[n_axis] < n:
        layout = "(N, K), see prepare_weight" if kmajor else "(K, N)"
        raise ValueError(f"w has shape {tuple(w.shape)}; for x of K={k} and N={n} it must be {layout}")
    if interpret and kmajor and not INTERPRETS_8BIT:
        raise NotImplementedError(
            f"Pallas' GPU interpreter of jax {jax.__version__} cannot run 8-bit wgmma (it reads no "
            "transposed shared-memory views); interpret the 16-bit variant, use jax >= 0.11, or run "
            "on an sm_90 GPU"
        )
    k_max = max(k, w.shape[k_axis])
    rows = sum(name in _ROW for name in epilogue)
    cfg = choose_config(
        m,
        config,
        k_iters=-(-k_max // 128),
        operand_bytes=operand_bytes,
        out_bytes=jnp.dtype(out_dtype).itemsize,
        depth=max(rows, len(epilogue) - rows),
    )
    kp = round_up(k_max, cfg.tile_k)
    xp = pad_axis(pad_axis(x, 0, cfg.tile_m), 1, kp)
    wp = pad_axis(pad_axis(w, n_axis, 2 * cfg.tile_n), k_axis, kp)
    mp, np_ = xp.shape[0], wp.shape[n_axis]
    tiles = (mp // cfg.tile_m) * (np_ // (2 * cfg.tile_n))
    names = tuple(name for name in _ORDER if name in epilogue)
    table: dict[bool, list[jax.Array]] = {True: [], False: []}  # row vectors, column vectors
    for name in names:
        a = epilogue[name]
        if name in _ROW:
            v = pad_axis(jnp.broadcast_to(a, (m, 1)).reshape(m), 0, cfg.tile_m)
        else:
            v = pad_axis(jnp.broadcast_to(a, (1, n)).reshape(n), 0, np_)
        v = lax.bitcast_convert_type(v.astype(jnp.int32), jnp.float32) if name in _INT else v
        table[name in _ROW].append(v.astype(jnp.float32))
    depth = max(len(table[True]), len(table[False]))
    operands = [  # (depth, Mp) row vectors and (depth, Np) column vectors, zero rows below
        pad_axis(jnp.stack(t), 0, depth) for t in (table[True], table[False]) if t
    ]
    body = functools.partial(
        _kernel, names=names, cfg=cfg, acc_dtype=acc_dtype, out_dtype=out_dtype, w_kmajor=kmajor
    )
    fn = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(min(num_sms(), tiles, cfg.max_ctas),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params() if interpret else None,
    )
    return fn(xp, wp, *operands)[:m, :n]


# ------------------------------------------------------------------------------------------------
# The kernels by name: the arguments of the main kernels, the weight in `layout`


class HopperOptions(NamedTuple):
    """The keyword arguments of the Hopper kernels beside the main kernels' ones: the tiles
    (``config``: a :class:`HopperConfig` or some of its fields, over :data:`HOPPER_TABLE`), the
    weight's ``layout`` and ``interpret`` (Pallas' GPU interpreter)."""

    config: HopperConfig | Mapping[str, Any] | None = None
    layout: WeightLayout = KN
    interpret: bool = False


def _hopper_options(kw: Mapping[str, Any]) -> tuple[HopperOptions, dict[str, Any]]:
    """``kw`` as the Hopper options and the others (for the main kernel's check)."""
    fields = HopperOptions._fields
    return HopperOptions(**{k: v for k, v in kw.items() if k in fields}), {
        k: v for k, v in kw.items() if k not in fields
    }


def _hopper_matmul(
    x_q: jax.Array,
    w_q: jax.Array,
    epi: Mapping[str, jax.Array],
    acc_dtype: Any,
    out_dtype: Any,
    opts: HopperOptions,
) -> jax.Array:
    """Checked operands through :func:`scaled_matmul_hopper`; ``w_q`` prepared (a transpose per call
    for a ``(K, N)`` weight: :func:`prepare_weight` once to avoid it)."""
    wp = prepare_weight(w_q, layout=opts.layout)
    n = w_q.shape[opts.layout.n_axis]
    kw = dict(n=n, acc_dtype=acc_dtype, out_dtype=out_dtype, config=opts.config, interpret=opts.interpret)
    return scaled_matmul_hopper(x_q, wp, epi, **kw)


def w8a8_matmul_hopper(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, **kw: Any
) -> jax.Array:
    """:func:`qjax.kernels.w8a8.w8a8_matmul` on this kernel: the same operands and epilogue arguments
    (``x_zero_point``, ``bias``, ``out_dtype``), ``w_q`` int8 ``(K, N)`` or, with ``layout``
    :data:`qjax.kernels.experimental.nk_layout.NK`, ``(N, K)``; ``config`` over
    :data:`HOPPER_TABLE`; ``interpret``: Pallas' GPU interpreter."""
    opts, epilogue = _hopper_options(kw)
    x_q, w_q, epi, dt = check_w8a8(x_q, x_scale, w_q, w_scale, layout=opts.layout, **epilogue)
    return _hopper_matmul(x_q, w_q, epi, jnp.int32, dt, opts)


def int8_matmul_hopper(x_q: jax.Array, w_q: jax.Array, **kw: Any) -> jax.Array:
    """:func:`qjax.kernels.w8a8.int8_matmul` (the raw int32 accumulator) on this kernel (``config``,
    ``layout``, ``interpret`` as in :func:`w8a8_matmul_hopper`)."""
    opts, rest = _hopper_options(kw)
    x_q, w_q = check_int8(x_q, w_q, opts.layout, **rest)
    return _hopper_matmul(x_q, w_q, {}, jnp.int32, jnp.int32, opts)


def fp8_matmul_hopper(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, **kw: Any
) -> jax.Array:
    """:func:`qjax.kernels.fp8.fp8_matmul` on this kernel (``bias``, ``out_dtype``; ``config``,
    ``layout``, ``interpret`` as in :func:`w8a8_matmul_hopper`)."""
    opts, epilogue = _hopper_options(kw)
    x_q, w_q, epi, dt = check_fp8(x_q, x_scale, w_q, w_scale, layout=opts.layout, **epilogue)
    return _hopper_matmul(x_q, w_q, epi, jnp.float32, dt, opts)
