"""Where the W4A16 kernel's time goes at decode sizes: parts of the kernel timed beside it.

``python -m experiments.kernels.profile_w4a16 [--shapes 7b.qkv,7b.down] [--m 1,16] [--out F.json]``

At M <= 16 the W4A16 matmul should be bound by reading its packed weight, a quarter of the bf16
weight's bytes; the H100 runs of ``docs/benchmarks/kernels_h100.md`` streamed 1.0-1.5 TB/s where
XLA's bf16 matmul streams 2.0-2.8 TB/s. This script splits the kernel into cumulative parts on the
same grid, blocks and packed weights, so one GPU run says which part costs the time:

* ``bf16``: XLA's bf16 matmul of the same shape, the yardstick of every ratio;
* ``xla-read``: XLA reads the packed bytes (column sums of the uint8 array): how fast XLA alone
  streams them;
* ``stream``: the kernel's grid and loads of the packed bytes (:func:`stream_body`), summed as
  integers: no unpack, no dot, no activations;
* ``unpack``: ``stream`` plus the float-bits unpack into bf16 (:func:`unpack_body`), summed: no dot;
  ``unpack asm`` the same with the PTX unpack (``unpack="asm"``, GPU only);
* ``kernel``: :func:`qjax.kernels.w4a16.w4a16_matmul` as served (table blocks, automatic split of K);
* variants of ``kernel``: one change each (``split_k=1``, other blocks, warps, stages, and the
  experimental options of :mod:`qjax.kernels.experimental.w4a16_variants`: ``swap_ab``,
  ``unpack="convert"`` / ``"asm"``), and on a GPU ``swap_ab`` with ``unpack="asm"`` together;
* ``mgpu``: the experimental Hopper kernel for small M (:mod:`qjax.kernels.experimental.hopper_w4`,
  GPU only), and with the converted weight staged through shared memory or 4 K slices in flight
  (not 8).

The parts run on the kernel's grid as bodies of
:func:`qjax.kernels.experimental.w4a16_variants.w4a16_matmul_variant` (``gpu_body``).

Every row is timed as ``experiments.kernels.bench`` times a cell (one jitted program over ``R``
weight copies that together exceed the L2 cache, median of repeated samples, compile excluded; on a
GPU by CUPTI's kernel durations, with the program's kernels listed by name, so that e.g. the split-K
reduction after the kernel shows as its own line; ``--clock``, :mod:`experiments.kernels.timing`) and
reports microseconds per call, GB/s of the packed weight and scales, the Pallas grid that ran
(M blocks x N blocks x K ranges) and ``bf16`` time / row time. ``--interpret`` runs every Pallas
row in the interpreter on the ``tiny`` shapes (a smoke test: the times mean nothing). Results go to
``--out`` as JSON, written after every (shape, M).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from experiments.kernels import timing
from experiments.kernels.bench.data import ShapeData, tree_nbytes
from experiments.kernels.bench.programs import build_program, error_text
from experiments.kernels.bench.render import top_kernel
from experiments.kernels.bench.rows import SHAPES
from experiments.records import write_json
from qjax.kernels import launch, tuning, w4a16
from qjax.kernels.backend import resolve_backend
from qjax.kernels.experimental import hopper_w4, w4a16_variants

Row = dict[str, Any]


def _step(first: Any, step: Any, total_steps: int) -> tuple[Any, Any]:
    """The K step ``first + step`` (the last one repeated past the end, as the kernel does) and 0/1."""
    t = first + step
    return jnp.minimum(t, total_steps - 1), (t < total_steps).astype(jnp.int32)


def _write_columns(o_ref: Any, columns: jax.Array, rows: int) -> None:
    """Every real row (the first ``rows`` of the output, as the kernel writes them) of the output
    tile gets the (1, bn) column values."""
    tile = jnp.broadcast_to(columns.astype(jnp.float32), o_ref.shape[-2:])
    launch.store_rows(o_ref, tile.reshape(o_ref.shape).astype(o_ref.dtype), rows)


def stream_body(*refs: Any, group: int, groups_per_step: int, ranges: launch.KRanges, **_: Any) -> None:
    """The W4A16 kernel's loads of packed bytes, summed as integers per column (output: the sums)."""
    p_ref, o_ref = refs[1], refs[-1]
    half, first = group // 2, pl.program_id(2) * ranges.steps

    def body(step: Any, carry: jax.Array) -> jax.Array:
        t, keep = _step(first, step, ranges.total)
        for j in range(groups_per_step):
            grp = t * groups_per_step + j
            carry = carry + p_ref[pl.ds(grp * half, half), :].astype(jnp.int32) * keep
        return carry

    carry = jax.lax.fori_loop(0, ranges.steps, body, jnp.zeros((half, p_ref.shape[-1]), jnp.int32))
    _write_columns(o_ref, jnp.sum(carry, axis=0, keepdims=True), ranges.rows)


def unpack_body(
    *refs: Any,
    group: int,
    groups_per_step: int,
    ranges: launch.KRanges,
    unpack: w4a16.UnpackGroup,
    **_: Any,
) -> None:
    """The loads and the unpack (``unpack``: the float bits, or the PTX ones) of signed codes into the
    activation dtype, summed per column: ``sum_k q_kn`` (output)."""
    x_ref, p_ref, o_ref = refs[0], refs[1], refs[-1]
    half, dt, first = group // 2, x_ref.dtype, pl.program_id(2) * ranges.steps

    def body(step: Any, carry: jax.Array) -> jax.Array:
        t, keep = _step(first, step, ranges.total)
        for j in range(groups_per_step):
            grp = t * groups_per_step + j
            lo, hi = unpack(p_ref[pl.ds(grp * half, half), :], None, dt)  # signed codes: excess-8
            carry = carry + (lo + hi) * keep.astype(dt)
        return carry

    carry = jax.lax.fori_loop(0, ranges.steps, body, jnp.zeros((half, p_ref.shape[-1]), dt))
    _write_columns(o_ref, jnp.sum(carry.astype(jnp.float32), axis=0, keepdims=True), ranges.rows)


def part_fn(
    body: Callable[..., None], backend: str, unpack: str = "magic"
) -> Callable[[jax.Array, w4a16.PackedW4], jax.Array]:
    """``(x, w) -> (M, N)`` running ``body`` on the grid, blocks and operands of the served kernel."""

    def part(x: jax.Array, w: w4a16.PackedW4) -> jax.Array:
        variant = w4a16_variants.w4a16_matmul_variant
        return variant(x, w, out_dtype=jnp.float32, backend=backend, unpack=unpack, gpu_body=body)

    return part


def variants(m: int, backend: str) -> list[tuple[str, str, Callable[[Any, Any], jax.Array]]]:
    """``(name, weight family, fn)`` of every row, in print order."""
    table = tuning.choose_blocks("w4a16", backend, m)

    def kernel(**kw: Any) -> Callable[[Any, Any], jax.Array]:
        """The served kernel, or with ``swap_ab`` / ``unpack`` the experimental variant."""
        experimental = {"swap_ab", "unpack"} & set(kw)
        matmul = w4a16_variants.w4a16_matmul_variant if experimental else w4a16.w4a16_matmul
        return lambda x, w: matmul(x, w, backend=backend, **kw)

    def xla_read(x: jax.Array, w: w4a16.PackedW4) -> jax.Array:
        return jnp.sum(w.packed, axis=0, dtype=jnp.int32, keepdims=True)

    rows: list[tuple[str, str, Callable[[Any, Any], jax.Array]]] = [
        ("bf16", "bf16", lambda x, w: jnp.dot(x, w)),
        ("xla-read", "w4", xla_read),
        ("stream", "w4", part_fn(stream_body, backend)),
        ("unpack", "w4", part_fn(unpack_body, backend)),
        ("kernel", "w4", kernel()),
        ("kernel split_k=1", "w4", kernel(split_k=1)),
        ("kernel swap_ab", "w4", kernel(swap_ab=True)),
        ("kernel unpack=convert", "w4", kernel(unpack="convert")),
    ]
    if backend == "gpu":  # PTX: nowhere else
        rows[4:4] = [("unpack asm", "w4", part_fn(unpack_body, backend, "asm"))]
        rows.append(("kernel unpack=asm", "w4", kernel(unpack="asm")))
        rows.append(("kernel swap_ab unpack=asm", "w4", kernel(swap_ab=True, unpack="asm")))  # both
        if m <= hopper_w4.MAX_M:  # the Hopper kernel (Mosaic GPU), weight prepared once

            def hopper(**kw: Any) -> Callable[[Any, Any], jax.Array]:
                config = hopper_w4.HopperW4Config(**kw)
                return lambda x, w: hopper_w4.w4a16_matmul_hopper(x, w, config=config)

            rows += [
                ("mgpu", "w4-hopper", hopper()),
                ("mgpu a_in_smem", "w4-hopper", hopper(a_in_smem=True)),
                ("mgpu steps=4", "w4-hopper", hopper(max_concurrent_steps=4)),
            ]
    for name, values in (
        ("block_n", (64, 256)),
        ("block_k", (512,)),
        ("num_warps", (8,)),
        ("num_stages", (5,)),
    ):
        for value in values:
            if value != getattr(table, name):
                changed = dataclasses.replace(table, **{name: value})
                rows.append((f"kernel {name}={value}", "w4", kernel(blocks=changed)))
    return rows


def pallas_grid(fn: Callable[..., Any], *args: Any) -> str:
    """The grid of the Pallas call in ``fn(*args)``, e.g. ``"1x96x4"``, or ``"-"`` if there is none."""

    def find(jaxpr: Any) -> str:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                return "x".join(str(d) for d in eqn.params["grid_mapping"].grid)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns") and (found := find(inner)) != "-":
                    return found
        return "-"

    return find(jax.make_jaxpr(fn)(*args).jaxpr)


def time_row(
    fn: Callable[[Any, Any], jax.Array], x: Any, ws: list[Any], repeats: int, clock: str = "wall"
) -> Row:
    """Time ``fn`` over the weight copies ``ws`` as ``experiments.kernels.bench`` times a cell."""
    grid = pallas_grid(fn, x, ws[0])
    compiled = jax.jit(build_program(fn)).lower(x, *ws).compile()
    t = timing.time_program(clock, compiled, (x, *ws), len(ws), repeats)
    nbytes = tree_nbytes(ws[0])
    row = {
        "us": t.seconds * 1e6,
        "spread": t.spread,
        "clock": t.clock,
        "grid": grid,
        "weight_bytes": nbytes,
        "gb_per_s": nbytes / t.seconds / 1e9,
    }
    if t.kernels is not None:
        row["device_kernels"] = t.kernels
    if t.note is not None:
        row["clock_note"] = t.note
    return row


def run(
    shapes: Sequence[str],
    ms: Sequence[int],
    backend: str,
    copies: int | None,
    repeats: int,
    budget_s: float,
    write: Callable[[list[Row]], None],
    clock: str = "wall",
) -> list[Row]:
    """Every row of :func:`variants` for every shape and M; ``write(rows)`` after each (shape, M)."""
    started = time.perf_counter()
    rows: list[Row] = []
    for shape in shapes:
        k, n = SHAPES[shape]
        data = ShapeData(k, n, max(ms), copies)
        for m in ms:
            if time.perf_counter() - started > budget_s:
                print(f"time budget of {budget_s:g} s reached; stopped before {shape} M={m}", flush=True)
                data.delete()
                return rows
            x, base = data.activations("bf16", m), None
            for name, family, fn in variants(m, backend):
                row: Row = {"shape": shape, "k": k, "n": n, "m": m, "row": name}
                rows.append(row)
                try:
                    row |= time_row(fn, x, data.weight_copies(family), repeats, clock)
                except Exception as e:  # a variant that fails is reported; the others still run
                    row["error"] = error_text(e)
                    print(f"  {shape} M={m} {name}: failed: {row['error']}", flush=True)
                    continue
                base = row["us"] if name == "bf16" else base
                row["vs_bf16"] = None if base is None else base / row["us"]
                ratio = "" if base is None else f"{row['vs_bf16']:.2f}x"
                print(
                    f"  {shape:8s} M={m:<3d} {name:24s} {row['us']:9.1f} us {row['gb_per_s']:8.1f} GB/s "
                    f"{ratio:>7s}  grid {row['grid']}{top_kernel(row)}",
                    flush=True,
                )
            data.delete(activations_only=True)
            write(rows)
        data.delete()
    return rows


def atomic_writer(out: pathlib.Path | None, meta: dict[str, Any]) -> Callable[[list[Row]], None]:
    """Write ``{"meta", "rows"}`` to ``out`` atomically (``experiments.records.write_json``)."""

    def write(rows: list[Row]) -> None:
        if out is not None:
            write_json(out, {"meta": meta, "rows": rows})

    return write


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m experiments.kernels.profile_w4a16``."""
    parser = argparse.ArgumentParser(prog="python -m experiments.kernels.profile_w4a16", description=__doc__)
    parser.add_argument("--shapes", default=None, help="of experiments.kernels.bench.rows.SHAPES")
    parser.add_argument("--m", default="1,16")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpreter, tiny shapes")
    parser.add_argument("--copies", type=int, default=None, help="weight copies per program (default: > L2)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--time-budget-s", type=float, default=90.0)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    timing.add_clock_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    backend = "interpret" if args.interpret else resolve_backend(None).value
    if backend not in ("gpu", "interpret"):
        parser.error(
            f"the W4A16 profile times the Triton kernel: it needs a GPU or --interpret, not {backend!r}"
        )
    shapes = (args.shapes or ("tiny.a" if args.interpret else "7b.qkv,7b.down")).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    try:
        ms = [int(v) for v in args.m.split(",")]
    except ValueError:
        parser.error(f"--m: expected comma-separated integers, got {args.m!r}")
    if any(m < 1 for m in ms):
        parser.error(f"--m: token counts must be >= 1, got {args.m!r}")
    clock, clock_note = timing.resolve_clock(args.clock, parser.error)
    device = jax.devices()[0].device_kind
    meta = {
        "device": device,
        "jax": jax.__version__,
        "backend": backend,
        "clock": clock,
        "method": timing.describe(clock, clock_note),
        "argv": list(argv or sys.argv[1:]),
    }
    print(f"device: {device}, jax {jax.__version__}, backend {backend}; clock: {meta['method']}", flush=True)
    write = atomic_writer(args.out, meta)
    rows = run(shapes, ms, backend, args.copies, args.repeats, args.time_budget_s, write, clock)
    write(rows)
    print(f"{len(rows)} rows" + (f"; wrote {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
