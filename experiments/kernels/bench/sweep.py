"""The sweep: every kernel at every (shape, M), one (shape, M) group at a time, within a time
budget; the crossovers and the goals of its cells."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

from experiments.kernels import goals
from experiments.kernels.bench.accounting import Peaks, add_speedups, crossover
from experiments.kernels.bench.data import ShapeData
from experiments.kernels.bench.programs import build_program, compile_cells, error_text, lower_cell, time_cell
from experiments.kernels.bench.rows import BASELINE, MAX_M, kernel_fn


@dataclasses.dataclass(frozen=True)
class Config:
    kernels: tuple[str, ...]
    shapes: tuple[tuple[str, int, int], ...]  # (name, K, N)
    ms: tuple[int, ...]
    repeats: int
    backend: str  # "gpu", "tpu", "interpret" (Pallas kernels) or "reference" (XLA *_reference)
    copies: int | None  # fixed R, or None: chosen per weight size
    budget_s: float | None
    compile_workers: int = 1
    skipped: tuple[str, ...] = ()
    clock: str = "wall"  # "device" (CUPTI) or "wall", see experiments.kernels.timing
    clock_note: str | None = None  # why --clock auto fell back to the wall clock


@dataclasses.dataclass
class Sweep:
    config: Config
    meta: dict[str, Any]
    peaks: Peaks | None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_group_s: float = 0.0
    stopped: str | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        """Whether the next (shape, M) group, estimated as long as the last one, would overrun."""
        budget = self.config.budget_s
        if budget is not None and self.elapsed() + self.last_group_s > budget:
            self.stopped = f"time budget of {budget:g} s reached after {self.elapsed():.1f} s"
        return self.stopped is not None


def run_group(
    sweep: Sweep,
    shape: tuple[str, int, int],
    m: int,
    programs: Mapping[str, Callable[..., Any]],
    data: ShapeData,
) -> list[dict[str, Any]]:
    """Every kernel at one (shape, M): inputs made and programs lowered one by one, compiled (in
    parallel), then timed one after another. Failures are recorded in the cells, not raised."""
    name, k, n = shape
    kernels = [kern for kern in sweep.config.kernels if m <= MAX_M.get(kern, m)]
    cells = {kern: {"kernel": kern, "shape": name, "k": k, "n": n, "m": m} for kern in kernels}
    lowered: dict[str, Any] = {}
    args: dict[str, tuple[Any, ...]] = {}
    for kernel, cell in cells.items():
        try:  # a broken kernel or an out-of-memory must not end the sweep
            lowered[kernel], args[kernel] = lower_cell(cell, programs[kernel], data)
        except Exception as e:
            cell["error"] = error_text(e)
    compiled = compile_cells(lowered, cells, sweep.config.compile_workers)
    lowered.clear()
    for kernel, executable in compiled.items():
        try:
            time_cell(
                cells[kernel], executable, args[kernel], sweep.config.clock, sweep.config.repeats, sweep.peaks
            )
        except Exception as e:
            cells[kernel]["error"] = error_text(e)
    return list(cells.values())


def run_shape(
    sweep: Sweep,
    shape: tuple[str, int, int],
    programs: Mapping[str, Callable[..., Any]],
    on_cell: Callable[[dict[str, Any]], None],
) -> None:
    """Every (kernel, M) of one shape, ``on_cell`` called on each cell measured; the shape's data is
    made once and deleted at the end."""
    data = ShapeData(shape[1], shape[2], max(sweep.config.ms), sweep.config.copies)
    try:
        for m in sweep.config.ms:
            if sweep.out_of_time():
                return
            start = time.perf_counter()
            cells = run_group(sweep, shape, m, programs, data)
            sweep.last_group_s = time.perf_counter() - start
            sweep.cells += cells
            add_speedups(sweep.cells)
            for cell in cells:
                on_cell(cell)
            data.delete(activations_only=True)
    finally:
        data.delete()


def crossovers(sweep: Sweep) -> list[dict[str, Any]]:
    """Per non-baseline kernel and shape: speedup at each M and the crossover M."""
    rows = []
    for kernel in sweep.config.kernels:
        if kernel == BASELINE:
            continue
        for name, _, _ in sweep.config.shapes:
            cells = [c for c in sweep.cells if c["kernel"] == kernel and c["shape"] == name]
            if cells:
                speedups = {c["m"]: c.get("speedup") for c in cells}
                rows.append(
                    {"kernel": kernel, "shape": name, "speedups": speedups, "crossover": crossover(speedups)}
                )
    return rows


def goal_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """The goals of :mod:`experiments.kernels.goals` judged on this sweep (none off GPUs)."""
    return goals.judge(sweep.config.backend, [name for name, _, _ in sweep.config.shapes], sweep.cells)


def run_sweep(
    sweep: Sweep,
    write: Callable[[Sweep], None],
    on_cell: Callable[[dict[str, Any]], None],
    log: Callable[[str], None] = print,
) -> None:
    """Run every shape of the sweep, ``on_cell`` called on each cell measured, writing the results
    after each shape."""
    programs = {k: build_program(kernel_fn(k, sweep.config.backend)) for k in sweep.config.kernels}
    for shape in sweep.config.shapes:
        if sweep.stopped:
            break
        run_shape(sweep, shape, programs, on_cell)
        write(sweep)
    if sweep.stopped:
        log(f"stopped: {sweep.stopped}")
