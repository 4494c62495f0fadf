"""Experimental: W4A16 at small M on Hopper (sm_90), Pallas on Mosaic GPU: the int4 weight as
``wgmma``'s register operand.

At decode sizes (M <= 64) the W4A16 matmul only has to stream its packed weight. This kernel computes
``y^T = w^T x^T`` ("swap AB"): the weight, stored ``(N, K)`` as signed int4 codes, is the left
operand of ``wgmma``, which Hopper reads from registers, so each K slice goes HBM -> shared memory
by TMA -> registers, is converted to bf16 / f16 there and multiplied without a trip back to shared
memory; the activations ``x^T`` (``K x M``, M padded to a multiple of 16) are the right operand
from shared memory, and M is the narrow ``N`` side of the instruction (any multiple of 8 up to 256).

**Layout.** :func:`prepare_w4` turns a :class:`~qjax.kernels.w4a16.PackedW4` into a
:class:`HopperW4`: codes ``q - 8`` as ``int4`` ``(N_pad, K_pad)`` (``N_pad`` a multiple of 128,
``K_pad`` of 8 groups, so that K splits evenly many ways), float32 scales ``(G, N_pad)`` and, for
asymmetric weights, the zero points relative to the signed codes, ``z - 8``. Prepared once per
weight, like the packing itself; the call pads only ``x``.

**Grid.** One CTA per (128 output columns, K range): two compute warpgroups own 64 columns each and a
memory warpgroup keeps ``max_concurrent_steps`` K slices (one quantization group each: ``tile_k =
group_size``, 64 or 128) of ``x``, ``w`` and the group's vectors in flight
(``emit_pipeline_warp_specialized``). K is split over enough CTAs to give about two waves of the
GPU's SMs (``splits``, a divisor of the K slices); the ranges write float32 partial sums ``(splits,
N_pad, M_pad)`` that XLA adds up, transposes and casts (with the bias) in one fusion. ``x`` is
zero-padded over the weight's K padding, so those rows add nothing.

**Per group** ``j`` the warpgroup converts its codes to ``q - z_j`` (``q - 8`` minus ``z_j - 8``;
small integers, exact in 16 bits), computes ``d = (q - z_j)^T x^T`` with ``wgmma`` into a float32
accumulator and adds ``s_j d`` to its float32 total in registers: the scale is applied in float32
after the dot, as in the Triton kernel, so no dequantized weight is rounded to 16 bits.

In Pallas' GPU interpreter (:data:`qjax.kernels.experimental.hopper.INTERPRETS_8BIT`) the
converted weight is staged through shared memory (the interpreter's ``wgmma`` takes no register
operand; ``a_in_smem=True``). Status and checks: ``docs/benchmarks/kernels_status.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from qjax.kernels.common import pad_axis, round_up
from qjax.kernels.experimental import hopper
from qjax.kernels.w4a16 import PackedW4, check_w4a16_call, packed_codes

__all__ = ["HopperW4", "HopperW4Config", "prepare_w4", "w4a16_matmul_hopper"]

TILE_N = 64  # output columns per compute warpgroup (wgmma's M)
CTA_N = 2 * TILE_N
MAX_M = 128
ACT_DTYPES = (jnp.bfloat16, jnp.float16)
TARGET_CTAS = 2 * hopper.H100_SMS  # about two waves of an H100
K_SLICES_MULTIPLE = 8  # K padded (once, by prepare_w4) to a multiple of 8 slices: many ways to split it


class HopperW4(NamedTuple):
    """A W4A16 weight prepared for :func:`w4a16_matmul_hopper` (a pytree; ``k, n, group_size`` static).

    ``codes`` int4 ``(N_pad, K_pad)``: ``q - 8`` (signed codes as stored, or unsigned codes minus 8);
    ``scales`` float32 ``(G, N_pad)``; ``zeros`` float32 ``(G, N_pad)`` of ``z - 8`` or None
    (symmetric). Padded columns have scale 0, and ``x`` is zero-padded over padded rows, so
    neither adds anything."""

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    k: int
    n: int
    group_size: int


jax.tree_util.register_pytree_node(
    HopperW4,
    lambda w: ((w.codes, w.scales, w.zeros), (w.k, w.n, w.group_size)),
    lambda aux, children: HopperW4(*children, *aux),
)


@dataclasses.dataclass(frozen=True)
class HopperW4Config:
    """Launch parameters: K slices in flight (None: as many of 8, 6, 4, 3, 2 as fit in shared
    memory), K ranges (None: enough CTAs for two waves) and where the converted weight meets
    ``wgmma`` (registers, or staged through shared memory)."""

    max_concurrent_steps: int | None = None
    splits: int | None = None
    a_in_smem: bool = False

    def __post_init__(self) -> None:
        steps = self.max_concurrent_steps
        if steps is not None and (not isinstance(steps, int) or not 2 <= steps <= 16):
            raise ValueError(
                f"max_concurrent_steps={self.max_concurrent_steps!r}: expected an int in [2, 16]"
            )
        if self.splits is not None and (not isinstance(self.splits, int) or self.splits < 1):
            raise ValueError(f"splits={self.splits!r}: expected None or an int >= 1")


def prepare_w4(w: PackedW4) -> HopperW4:
    """``w`` in the layout of :func:`w4a16_matmul_hopper` (group size 64 or 128)."""
    if not isinstance(w, PackedW4):
        raise TypeError(f"w: expected a PackedW4 from pack_w4, got {type(w).__name__}")
    if w.group_size not in (64, 128):
        raise ValueError(
            f"group_size={w.group_size}: the Hopper W4A16 kernel takes one group per K slice of 64 or "
            "128 rows; use w4a16_matmul (Triton) for group size 32 or larger groups"
        )
    slices = K_SLICES_MULTIPLE * w.group_size
    codes = packed_codes(w) + (8 if w.symmetric else 0)  # (K_pad, N_pad) unsigned nibbles 0..15
    signed = jnp.transpose(codes - 8).astype(jnp.int4)  # (N_pad, K_pad)
    signed = pad_axis(pad_axis(signed, 0, CTA_N), 1, slices)

    def grid(a: jax.Array) -> jax.Array:  # (G, N_pad) -> padded groups and columns
        return pad_axis(pad_axis(a, 1, CTA_N), 0, K_SLICES_MULTIPLE)

    zeros = None if w.zeros is None else grid(w.zeros - 8.0)
    return HopperW4(signed, grid(w.scales), zeros, w.k, w.n, w.group_size)


def smem_bytes(mp: int, tk: int, x_bytes: int, asym: bool, stages: int, a_in_smem: bool) -> int:
    """Shared memory of one CTA: ``stages`` K slices of x, w and the group's vectors, the two
    warpgroups' output tiles (and staged weight tiles)."""
    per_stage = mp * tk * x_bytes + CTA_N * tk // 2 + 4 * CTA_N * (2 if asym else 1)
    staged = 2 * TILE_N * tk * x_bytes if a_in_smem else 0
    return stages * per_stage + 2 * TILE_N * mp * 4 + staged


def choose_stages(cfg: HopperW4Config, per: int, mp: int, tk: int, x_bytes: int, asym: bool) -> int:
    """K slices in flight: ``cfg``'s (checked against sm_90's shared memory) or the most that fit."""
    budget = hopper.SMEM_BYTES - 1024  # barriers and alignment

    def need(stages: int) -> int:
        return smem_bytes(mp, tk, x_bytes, asym, min(stages, per), cfg.a_in_smem)

    chosen = cfg.max_concurrent_steps
    if chosen is not None:
        if need(chosen) > budget:
            raise ValueError(
                f"{cfg} at M_pad={mp}, tile_k={tk} needs about {need(chosen)} bytes of shared memory, "
                f"more than the {hopper.SMEM_BYTES} of an sm_90 CTA; lower max_concurrent_steps"
            )
        return chosen
    return next((s for s in (8, 6, 4, 3, 2) if need(s) <= budget), 2)


def choose_splits(n_ctas: int, steps: int, splits: int | None) -> int:
    """K ranges: ``splits``, or the fewest that divide the ``steps`` K slices and give
    ``TARGET_CTAS`` CTAs (all of them if none does)."""
    if splits is not None:
        if steps % splits:
            raise ValueError(f"splits={splits}: must divide the {steps} K slices of the prepared weight")
        return splits
    want = -(-TARGET_CTAS // n_ctas)
    return min((d for d in range(1, steps + 1) if steps % d == 0 and d >= want), default=steps)


def _kernel(
    x_gmem: Any,
    w_gmem: Any,
    s_gmem: Any,
    *refs: Any,
    per: int,
    mp: int,
    tk: int,
    stages: int,
    a_in_smem: bool,
) -> None:
    # x (Mp, Kp) 16-bit; w (Np, Kp) int4; s (G, Np) f32; [z (G, Np) f32]; out (S, Np, Mp)
    from jax.experimental.pallas import mosaic_gpu as plgpu

    *zx, out_gmem = refs
    ni, si = lax.axis_index("n"), lax.axis_index("s")
    act_bits = jnp.dtype(x_gmem.dtype).itemsize * 8

    def transforms(minor: int, bits: int) -> tuple[Any, ...]:
        swizzle = plgpu.find_swizzle(minor * bits, "operand tile")
        return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))

    specs = [
        plgpu.BlockSpec(
            (mp, tk), lambda k: (0, k), transforms=transforms(tk, act_bits), memory_space=plgpu.SMEM
        ),
        plgpu.BlockSpec((CTA_N, tk), lambda k: (0, k), transforms=transforms(tk, 4), memory_space=plgpu.SMEM),
        plgpu.BlockSpec((1, CTA_N), lambda k: (k, 0), memory_space=plgpu.SMEM),
    ]
    if zx:
        specs.append(plgpu.BlockSpec((1, CTA_N), lambda k: (k, 0), memory_space=plgpu.SMEM))

    def pipeline(body: Any, context: Any) -> Any:
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(per,),
            memory_registers=40,
            in_specs=specs,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=context,
        )

    def ignore(*args: Any, **kwargs: Any) -> None:
        del args, kwargs

    k0 = si * per  # this CTA's first K slice
    n_sl = pl.ds(ni * CTA_N, CTA_N)
    operands = [
        x_gmem.at[:, pl.ds(k0 * tk, per * tk)],
        w_gmem.at[n_sl, pl.ds(k0 * tk, per * tk)],
        s_gmem.at[pl.ds(k0, per), n_sl],
    ]
    if zx:
        operands.append(zx[0].at[pl.ds(k0, per), n_sl])
    a_smem = (
        plgpu.SMEM((2, TILE_N, tk), x_gmem.dtype, transforms=transforms(tk, act_bits)) if a_in_smem else None
    )

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(*operands),
        out_smem=plgpu.SMEM((2, TILE_N, mp), jnp.float32),
        a_smem=a_smem,
        collective_axes="wg",
    )
    def _scope(allocs: Any, out_smem: Any, a_smem: Any) -> None:
        wg = lax.axis_index("wg")
        wg_sl = pl.ds(wg * TILE_N, TILE_N)
        shape = (TILE_N, mp)

        def mma(idx: Any, x_smem: Any, w_smem: Any, s_smem: Any, *rest: Any) -> Any:
            del idx
            *vecs, total = rest
            a = w_smem[wg_sl].astype(x_gmem.dtype)  # (64, tk): q - 8, exact in 16 bits
            if vecs:  # asymmetric: (q - 8) - (z - 8) = q - z, exact in 16 bits
                z = vecs[0][0, wg_sl].astype(x_gmem.dtype)
                a = a - lax.broadcast_in_dim(z, a.shape, (0,))
            if a_smem is not None:  # stage through shared memory (what the interpreter runs)
                a_smem[wg] = a
                plgpu.commit_smem()
                a = a_smem.at[wg]

            def group_dot(acc_ref: Any) -> Any:
                plgpu.wgmma(acc_ref, a, x_smem.transpose((1, 0)))
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            d = pl.run_scoped(group_dot, plgpu.ACC(shape, jnp.float32))  # (64, Mp)
            return total + d * lax.broadcast_in_dim(s_smem[0, wg_sl], shape, (0,))

        def context(run: Any) -> None:
            total = run(jnp.zeros(shape, jnp.float32))
            out_smem[wg] = total
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                out_smem.at[wg], out_gmem.at[si, pl.ds(ni * CTA_N + wg * TILE_N, TILE_N), :]
            )

        pipeline(mma, context)(*operands, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def w4a16_matmul_hopper(
    x: jax.Array,
    w: HopperW4,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = None,
    config: HopperW4Config | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``y = x @ dequant(w) (+ bias)`` for ``x`` ``(M, K)`` bf16 / f16 with ``M <= 128``, on sm_90.

    ``w`` from :func:`prepare_w4`; ``out_dtype`` defaults to ``x.dtype``. ``interpret`` runs Pallas'
    GPU interpreter (jax >= 0.11; the weight staged through shared memory)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    check_w4a16_call(
        x,
        w,
        bias,
        weight_type=HopperW4,
        maker="prepare_w4",
        dtypes=ACT_DTYPES,
        dtype_fix="is not bfloat16 or float16; cast x, or use w4a16_matmul",
    )
    m = x.shape[0]
    if m > MAX_M:
        raise ValueError(f"x: M={m} rows; this kernel is for M <= {MAX_M} (decode), use w4a16_matmul")
    cfg = config or HopperW4Config()
    if interpret:
        if not hopper.INTERPRETS_8BIT:
            raise NotImplementedError(
                f"Pallas' GPU interpreter of jax {jax.__version__} cannot run this kernel (it reads "
                "transposed shared-memory views); use jax >= 0.11, or run on an sm_90 GPU"
            )
        cfg = dataclasses.replace(cfg, a_in_smem=True)
    tk = w.group_size
    np_, kp = w.codes.shape
    steps = kp // tk
    splits = choose_splits(np_ // CTA_N, steps, cfg.splits)
    per = steps // splits
    mp = round_up(max(m, 1), 16)
    xp = pad_axis(pad_axis(x, 0, mp), 1, kp)  # zeros on the weight's K padding add nothing
    operands = [xp, w.codes, w.scales] + ([] if w.zeros is None else [w.zeros])
    stages = choose_stages(cfg, per, mp, tk, jnp.dtype(x.dtype).itemsize, w.zeros is not None)
    fn = plgpu.kernel(
        functools.partial(_kernel, per=per, mp=mp, tk=tk, stages=stages, a_in_smem=cfg.a_in_smem),
        out_type=jax.ShapeDtypeStruct((splits, np_, mp), jnp.float32),
        grid=(np_ // CTA_N, splits),
        grid_names=("n", "s"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=hopper.interpret_params() if interpret else None,
    )
    y = fn(*operands)[:, : w.n, :m].sum(axis=0).T  # (M, N) float32: the real rows and columns only
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(out_dtype or x.dtype)
