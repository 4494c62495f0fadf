"""One cell's program: the kernel applied to R weight copies in one jitted program, lowered,
compiled (XLA's autotuned dots one at a time first) and timed (the method of the package
docstring)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from experiments.kernels import timing
from experiments.kernels.bench.accounting import Peaks, add_metrics
from experiments.kernels.bench.data import ShapeData, tree_nbytes
from experiments.kernels.bench.rows import ACT_FAMILY, AUTOTUNED, WEIGHT_FAMILY


def build_program(fn: Callable[[Any, Any], jax.Array]) -> Callable[..., jax.Array]:
    """``program(x, *weights)``: ``fn`` applied to every weight copy, one scalar out.

    ``fn`` is wrapped in its own ``jax.jit`` so that its R calls are traced and lowered once."""
    inner = jax.jit(fn)

    def program(x: Any, *weights: Any) -> jax.Array:
        outs = []
        for r, w in enumerate(weights):
            xr, _ = lax.optimization_barrier((x, jnp.int32(r)))  # no CSE of x-only work across copies
            outs.append(inner(xr, w))
        outs = lax.optimization_barrier(outs)
        return jnp.stack([o[0, 0].astype(jnp.float32) for o in outs]).sum()

    return program


def error_text(e: BaseException) -> str:
    """``TypeName: first line of the message`` (at most 300 characters) of a failed cell."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def lower_cell(
    cell: dict[str, Any], program: Callable[..., Any], data: ShapeData
) -> tuple[Any, tuple[Any, ...]]:
    """The lowered program of a cell and its arguments; records the weight bytes and ``R``."""
    weights = data.weight_copies(WEIGHT_FAMILY[cell["kernel"]])
    x = data.activations(ACT_FAMILY[cell["kernel"]], cell["m"])
    cell.update(weight_bytes=tree_nbytes(weights[0]), copies=len(weights))
    return jax.jit(program).lower(x, *weights), (x, *weights)


def compile_cells(
    lowered: Mapping[str, Any], cells: Mapping[str, dict[str, Any]], workers: int
) -> dict[str, Any]:
    """Compile the lowered programs: the XLA programs (:data:`AUTOTUNED`) one at a time first (XLA
    autotunes their dots by timing candidates on the device), then the others on ``workers``
    threads. Failures are recorded in the cells."""

    def compile_one(kernel: str) -> Any:
        start = time.perf_counter()
        compiled = lowered[kernel].compile()
        cells[kernel]["compile_s"] = time.perf_counter() - start
        return compiled

    out: dict[str, Any] = {}

    def collect(kernel: str, future: concurrent.futures.Future[Any]) -> None:
        try:
            out[kernel] = future.result()
        except Exception as e:
            cells[kernel]["error"] = error_text(e)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for kernel in AUTOTUNED:
            if kernel in lowered:
                collect(kernel, pool.submit(compile_one, kernel))
        futures = {kernel: pool.submit(compile_one, kernel) for kernel in lowered if kernel not in AUTOTUNED}
        for kernel, future in futures.items():
            collect(kernel, future)
    return out


def time_cell(
    cell: dict[str, Any], compiled: Any, args: tuple[Any, ...], clock: str, repeats: int, peaks: Peaks | None
) -> None:
    """Time a compiled program on ``clock`` (:mod:`experiments.kernels.timing`) into its cell."""
    t = timing.time_program(clock, compiled, args, cell["copies"], repeats)
    cell.update(time_s=t.seconds, time_min_s=t.min_seconds, spread=t.spread, clock=t.clock)
    cell.update(launches=t.launches, repeats=t.repeats)
    if t.kernels is not None:
        cell["device_kernels"] = t.kernels
    if t.note is not None:
        cell["clock_note"] = t.note
    add_metrics(cell, peaks)
