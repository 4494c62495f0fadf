"""The command line of ``python -m experiments.kernels.bench`` (the package docstring says what it
measures and how)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import jax

from experiments.kernels import timing
from experiments.kernels.bench.accounting import device_peaks
from experiments.kernels.bench.data import COPY_TARGET_BYTES, MAX_COPIES
from experiments.kernels.bench.render import (
    backend_note,
    cell_line,
    compact_table,
    goals_text,
    header,
    method,
    writer,
)
from experiments.kernels.bench.rows import (
    BASELINE,
    HOPPER_KERNELS,
    INTERPRET,
    KERNELS,
    M_SWEEP,
    QUICK_ACCEL,
    QUICK_CPU,
    SHAPE_GROUPS,
    SHAPES,
    missing_modules,
)
from experiments.kernels.bench.sweep import Config, Sweep, run_sweep


def parse_shapes(spec: str) -> tuple[tuple[str, int, int], ...]:
    """Comma-separated shape names (``7b.qkv``), groups (``llama2-7b``, ``all``, ``tiny``) or ``KxN``."""
    names: list[str] = []
    for token in filter(None, (t.strip() for t in spec.split(","))):
        names += SHAPE_GROUPS.get(token, (token,))
    shapes = []
    for name in dict.fromkeys(names):
        if name in SHAPES:
            shapes.append((name, *SHAPES[name]))
        elif "x" in name and all(p.isdigit() for p in name.split("x", 1)):
            k, n = (int(p) for p in name.split("x", 1))
            shapes.append((name, k, n))
        else:
            raise SystemExit(f"--shapes: unknown {name!r}; names: {[*SHAPE_GROUPS, *SHAPES]} or KxN")
    return tuple(shapes)


def parse_kernels(spec: str) -> tuple[str, ...]:
    kernels = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise SystemExit(f"--kernels: unknown {unknown}; kernels: {list(KERNELS)}")
    return tuple(k for k in KERNELS if k in kernels or k == BASELINE)  # the baseline is always run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from experiments.kernels import bench

    p = argparse.ArgumentParser(
        prog="python -m experiments.kernels.bench", description=(bench.__doc__ or "").split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="few shapes and M (tiny shapes on CPU)")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    p.add_argument("--shapes", help="comma-separated shape names, groups or KxN (default: all layer shapes)")
    p.add_argument("--m", help=f"comma-separated token counts (default {','.join(map(str, M_SWEEP))})")
    p.add_argument("--repeats", type=int, help="timed samples per cell (default 10, --quick 5)")
    p.add_argument(
        "--backend",
        choices=("gpu", "tpu", "interpret", "reference"),
        help="default: the device's (gpu/tpu), 'reference' on CPU (XLA *_reference functions)",
    )
    p.add_argument(
        "--interpret", action="store_true", help="real Pallas kernels in interpret mode, tiny shapes"
    )
    timing.add_clock_argument(p)
    p.add_argument("--copies", type=int, help="weight copies per program R (default: by size; 2 on CPU)")
    workers = max(1, min(4, (os.cpu_count() or 2) // 2))
    p.add_argument(
        "--compile-workers", type=int, default=workers, help=f"compile threads (default {workers})"
    )
    p.add_argument("--time-budget-s", type=float, default=450.0, help="stop cleanly after this (default 450)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench_kernels/results.json"))
    p.add_argument("--md", type=pathlib.Path, help="markdown tables (default: --out with suffix .md)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    """The sweep the arguments ask for, with the device's defaults filled in."""
    from qjax.kernels.backend import resolve_backend

    cpu = jax.default_backend() == "cpu"
    backend = "interpret" if args.interpret else args.backend
    if backend is None:
        backend = "reference" if cpu else resolve_backend(None).value
    preset = None
    if backend == "interpret":
        preset = INTERPRET
    elif args.quick:
        preset = QUICK_CPU if cpu else QUICK_ACCEL
    shapes = parse_shapes(args.shapes or ",".join(preset.shapes if preset else SHAPE_GROUPS["all"]))
    ms = tuple(int(t) for t in args.m.split(",")) if args.m else tuple(preset.m if preset else M_SWEEP)
    kernels = parse_kernels(args.kernels)
    missing = {k: missing_modules(k) for k in kernels}
    skipped = tuple(f"{k} (missing {', '.join(missing[k])})" for k in kernels if missing[k])
    kernels = tuple(k for k in kernels if not missing[k])
    if backend == "tpu" and "w4a16-swap" in kernels:
        skipped += ("w4a16-swap (swap_ab: an option of the GPU kernel)",)
        kernels = tuple(k for k in kernels if k != "w4a16-swap")
    if backend != "gpu":
        skipped += tuple(
            f"{k} (Mosaic GPU: runs with backend gpu only)" for k in kernels if k in HOPPER_KERNELS
        )
        kernels = tuple(k for k in kernels if k not in HOPPER_KERNELS)
    repeats = args.repeats or (5 if args.quick or backend == "interpret" else 10)
    copies = args.copies or (2 if cpu or backend == "interpret" else None)
    clock, clock_note = timing.resolve_clock(args.clock, _exit)
    return Config(
        kernels,
        shapes,
        ms,
        repeats,
        backend,
        copies,
        args.time_budget_s,
        args.compile_workers,
        skipped,
        clock,
        clock_note,
    )


def _exit(message: str) -> NoReturn:
    raise SystemExit(message)


def make_meta(config: Config, argv: Sequence[str] | None) -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "backend": config.backend,
        "backend_note": backend_note(config),
        "method": method(config),
        "clock": config.clock,
        "peaks": None if (p := device_peaks(device.device_kind)) is None else dataclasses.asdict(p),
        "kernels": list(config.kernels),
        "skipped_kernels": list(config.skipped),
        "shapes": {name: [k, n] for name, k, n in config.shapes},
        "ms": list(config.ms),
        "repeats": config.repeats,
        "copies": config.copies or f"by size: >= {COPY_TARGET_BYTES} bytes, 2..{MAX_COPIES}",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()  # the budget counts device start-up too
    args = parse_args(argv)
    config = make_config(args)
    sweep = Sweep(config, {}, device_peaks(jax.devices()[0].device_kind), started)
    sweep.meta = make_meta(config, argv)
    md = args.md or (args.out.with_suffix(".md") if args.out else None)
    write = writer(args.out, md)
    print(header(sweep), flush=True)
    run_sweep(
        sweep,
        write,
        on_cell=lambda cell: print(cell_line(cell, sweep.elapsed()), flush=True),
        log=lambda line: print(line, flush=True),
    )
    write(sweep)
    print(f"total wall time {sweep.elapsed():.1f} s; wrote {args.out} and {md}")
    judged = goals_text(sweep)
    if judged:
        print(judged)
    print(compact_table(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
