"""The benchmark's results as text: progress lines, the compact speedup table, the header, the
markdown tables and the JSON payload (the goals of :mod:`experiments.kernels.goals` among them)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

from experiments.kernels import goals, timing
from experiments.kernels.bench.rows import BASELINE, XLA_KERNELS
from experiments.kernels.bench.sweep import Config, Sweep, crossovers, goal_rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cell_line(cell: dict[str, Any], elapsed: float) -> str:
    """One progress line for a measured cell."""
    head = f"[{elapsed:6.1f}s] {cell['kernel']:<11} {cell['shape']:<12} M={cell['m']:<5}"
    if "error" in cell:
        return f"{head} ERROR {cell['error']}"
    pct = cell["roofline_pct"]
    return (
        f"{head} {1e6 * cell['time_s']:9.1f} us {cell['tflops']:7.1f} TF/s {cell['gbps']:7.0f} GB/s "
        f"roof {'-' if pct is None else f'{pct:.1f}%':>6} speedup {_num(cell['speedup'], '.2f')} "
        f"(R={cell['copies']} L={cell['launches']} n={cell['repeats']} spread {100 * cell['spread']:.0f}% "
        f"compile {cell['compile_s']:.1f}s){top_kernel(cell)}"
        + (f" [wall clock: {cell['clock_note']}]" if "clock_note" in cell else "")
    )


def top_kernel(cell: dict[str, Any]) -> str:
    """`` longest: NAME xLAUNCHES P%`` of a device-timed cell's program (empty otherwise)."""
    kernels = cell.get("device_kernels")
    if not kernels:
        return ""
    total = sum(k["us"] for k in kernels)
    top = kernels[0]
    share = 100 * top["us"] / total if total > 0 else 0.0
    return f" longest: {top['name'][:48]} x{top['launches']} {share:.0f}% of {len(kernels)} kernels"


def compact_table(sweep: Sweep) -> str:
    """bf16 time per call (us) and every kernel's speedup over it at each M, with the crossover."""
    ms = sweep.config.ms
    width = max([11, *(len(s) for s, _, _ in sweep.config.shapes)])
    head = f"{'kernel':<11} {'shape':<{width}} " + " ".join(f"{'M=' + str(m):>8}" for m in ms)
    lines = [
        f"speedup over XLA bf16 (t_bf16 / t_kernel; bf16 rows: us per call); crossover = smallest M with "
        f"speedup < 1 [backend: {sweep.config.backend}]",
        f"{head}  crossover",
    ]
    by_key = {(c["kernel"], c["shape"], c["m"]): c for c in sweep.cells}
    cross = {(r["kernel"], r["shape"]): r["crossover"] for r in crossovers(sweep)}
    for kernel in sweep.config.kernels:
        for name, _, _ in sweep.config.shapes:
            row = [by_key.get((kernel, name, m)) for m in ms]
            if not any(row):
                continue
            if kernel == BASELINE:
                vals = [_num(c.get("time_s") and 1e6 * c["time_s"], ".1f") if c else "" for c in row]
            else:
                vals = [
                    ("ERR" if "error" in c else _num(c.get("speedup"), ".2f") + "x") if c else "" for c in row
                ]
            tail = "" if kernel == BASELINE else f"  {cross.get((kernel, name), '-')}"
            label = "bf16 (us)" if kernel == BASELINE else kernel
            lines.append(f"{label:<11} {name:<{width}} " + " ".join(f"{v:>8}" for v in vals) + tail)
    return "\n".join(lines)


def markdown(sweep: Sweep) -> str:
    """The full cell table and the crossover table, in markdown."""
    meta = sweep.meta
    lines = [
        f"# Kernel benchmark: {meta['device_kind']} ({meta['platform']}), backend `{meta['backend']}`",
        "",
        f"jax {meta['jax_version']}; {meta['method']}",
        "",
        "| kernel | shape | K | N | M | us/call | TFLOP/s | GB/s | % roofline | speedup vs bf16 | R |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sweep.cells:
        if "error" in c:
            error = c["error"][:80].replace("|", "/")
            lines.append(
                f"| {c['kernel']} | {c['shape']} | {c['k']} | {c['n']} | {c['m']} | error: {error} |"
                + " |" * 5
            )
            continue
        lines.append(
            f"| {c['kernel']} | {c['shape']} | {c['k']} | {c['n']} | {c['m']} | {1e6 * c['time_s']:.1f}"
            f"{' (wall)' if 'clock_note' in c else ''} | "
            f"{c['tflops']:.1f} | {c['gbps']:.0f} | {_num(c['roofline_pct'], '.1f')} | "
            f"{_num(c['speedup'], '.2f')} | {c['copies']} |"
        )
    ms = sweep.config.ms
    lines += ["", "| kernel | shape | " + " | ".join(f"M={m}" for m in ms) + " | crossover M |"]
    lines.append("|---|---|" + "---:|" * len(ms) + "---|")
    for r in crossovers(sweep):
        vals = [_num(r["speedups"].get(m), ".2f") for m in ms]
        lines.append(f"| {r['kernel']} | {r['shape']} | " + " | ".join(vals) + f" | {r['crossover']} |")
    goal_lines = goals.markdown_lines(goal_rows(sweep))
    if goal_lines:
        lines += ["", *goal_lines]
    timed = [c for c in sweep.cells if c.get("device_kernels")]
    if timed:
        lines += [
            "",
            "GPU kernels of each program (device clock; per program of R calls, longest first, top 3):",
            "",
            "| kernel | shape | M | R | kernels: name x launches: us |",
            "|---|---|---:|---:|---|",
        ]
        for c in timed:
            top = "; ".join(
                f"`{k['name'][:60]}` x{k['launches']}: {k['us']:.1f}" for k in c["device_kernels"][:3]
            )
            lines.append(f"| {c['kernel']} | {c['shape']} | {c['m']} | {c['copies']} | {top} |")
    if sweep.stopped:
        lines += ["", f"Stopped early: {sweep.stopped}."]
    return "\n".join(lines) + "\n"


def payload(sweep: Sweep) -> dict[str, Any]:
    """Everything measured, as JSON-ready data."""
    return {
        "meta": sweep.meta,
        "cells": sweep.cells,
        "crossover": [
            {**r, "speedups": {str(m): s for m, s in r["speedups"].items()}} for r in crossovers(sweep)
        ],
        "goals": goals.json_rows(goal_rows(sweep)),
        "wall_s": sweep.elapsed(),
        "stopped": sweep.stopped,
    }


def writer(out: pathlib.Path | None, md: pathlib.Path | None) -> Callable[[Sweep], None]:
    """A function writing the JSON and markdown results (each atomically) of a sweep."""
    from experiments.records import write_atomic, write_json

    def write(sweep: Sweep) -> None:
        if out is not None:
            write_json(out, payload(sweep))
        if md is not None:
            write_atomic(md, markdown(sweep))

    return write


def goals_text(sweep: Sweep) -> str:
    """The goals, one line per (goal, shape) measured: printed before the compact table."""
    return goals.text(goal_rows(sweep))


BACKEND_NOTES = {
    "reference": "XLA-compiled *_reference functions, NOT the Pallas kernels",
    "interpret": "Pallas kernels in the Pallas interpreter (tiny shapes; not representative timings)",
    "gpu": "Pallas kernels on Triton; the -mgpu rows Pallas on Mosaic GPU (sm_90)",
    "tpu": "Pallas kernels on Mosaic",
}
XLA_NOTE = "; the -xla rows: XLA's native int8 / fp8 dot (qjax.kernels.xla.contract) on every backend"
PROGRAMS = (
    "each program applies the kernel to R distinct weight copies (> L2 in total); time per call = "
    "program time / R, median over samples; compile excluded"
)


def backend_note(config: Config) -> str:
    """What the backend runs, for the results' header."""
    xla_rows = any(k in XLA_KERNELS for k in config.kernels)
    return BACKEND_NOTES[config.backend] + (XLA_NOTE if xla_rows else "")


def method(config: Config) -> str:
    """How the cells were timed, for the results' header."""
    return f"{timing.describe(config.clock, config.clock_note)}; {PROGRAMS}"


def header(sweep: Sweep) -> str:
    m, c = sweep.meta, sweep.config
    lines = [
        f"device: {m['device_kind']} ({m['platform']}); jax {m['jax_version']}; "
        f"backend: {c.backend} = {m['backend_note']}",
        f"method: {m['method']}",
        f"peaks: {m['peaks'] or '- (device not in the table: roofline columns are -)'}",
        f"sweep: {len(c.kernels)} kernels x {len(c.shapes)} shapes x {len(c.ms)} M = "
        f"{len(c.kernels) * len(c.shapes) * len(c.ms)} programs; M {list(c.ms)}; time budget {c.budget_s} s",
        f"R (weight copies per program): {m['copies']}; repeats <= {c.repeats}; "
        f"compile threads {c.compile_workers}",
    ]
    if any(s.startswith("tiny") for s, _, _ in c.shapes):
        lines.append(
            "shapes: tiny smoke shapes (not layer shapes): "
            + ", ".join(f"{s} {k}x{n}" for s, k, n in c.shapes)
        )
    if c.skipped:
        lines.append(f"skipped kernels: {', '.join(c.skipped)}")
    return "\n".join(lines)
