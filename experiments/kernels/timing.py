"""How the kernel experiments time a compiled program: device time from CUPTI, or the wall clock.

Every timed program applies one operation to ``copies`` distinct weight copies (so that the L2
cache cannot serve one copy's weights to the next), and a time *per call* is a program's time
divided by ``copies``. Two clocks:

* ``device``: the durations of the kernels the program launched, as recorded on the GPU by CUPTI
  (the activity records that Nsight Systems reads; through
  ``jax.experimental.mosaic.gpu.profiler.measure``). One warm-up execution, then ``repeats``
  executions back to back, each a sample: the sum of its kernels' durations. Gaps between kernels
  (launch latency, host work) are not counted; every kernel the program launches is, including the
  program's own small reduction of its outputs, so the kernel under test is never flattered. Each
  sample also lists its kernels by name (:attr:`Timing.kernels`): which kernels ran, how many times
  per program and for how long, e.g. whether XLA's bf16 matmul ran one cuBLAS kernel or a split-K
  pair. GPU only.
* ``wall``: ``time.perf_counter`` around ``jax.block_until_ready``; a sample launches the program
  ``launches`` times back to back, enough for a sample to last ``MIN_SAMPLE_S``, so that host
  dispatch overlaps device work. Includes the launch gaps between kernels inside a program. Every
  backend.

Both report the median per-call time over the samples and their interquartile range over the
median (``spread``). A program the device clock fails on is timed by the wall clock, and its
:class:`Timing` says so (``clock``, ``note``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax

CLOCKS = ("auto", "device", "wall")
MIN_SAMPLE_S = 2e-3
CELL_TIMING_S = 0.4  # wall clock: at most about this long per timed program (at least 3 samples)
MAX_LAUNCHES = 64
NAME_CHARS = 120  # kernel names are cut to this length in the breakdown

# measure(f, *, aggregate=False, iterations=n)(*args) -> (outputs, per-kernel timings in ms)
Measure = Callable[..., Callable[..., tuple[Any, Any]]]


@dataclasses.dataclass
class Timing:
    seconds: float  # median per-call time
    min_seconds: float
    spread: float  # (p75 - p25) / median of the per-call samples
    launches: int  # program executions per sample (1 for the device clock)
    repeats: int  # samples
    clock: str  # "device" or "wall"
    kernels: list[dict[str, Any]] | None = None  # device clock: per kernel name, see kernel_breakdown
    note: str | None = None  # why a program asked of the device clock was timed by the wall clock


def _summary(samples: Sequence[float]) -> tuple[float, float, float]:
    """Median, minimum and interquartile range over the median of positive samples."""
    med = statistics.median(samples)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [med, med, med]
    return med, min(samples), (q[2] - q[0]) / med


def time_wall(compiled: Callable[..., Any], args: Sequence[Any], copies: int, repeats: int) -> Timing:
    """Median per-call seconds of ``compiled(*args)`` (which makes ``copies`` calls), wall clock."""
    jax.block_until_ready(compiled(*args))  # warm-up
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    once = max(time.perf_counter() - start, 1e-7)
    launches = min(MAX_LAUNCHES, max(1, math.ceil(MIN_SAMPLE_S / once)))
    n = min(repeats, max(3, int(CELL_TIMING_S / (once * launches))))
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        for _ in range(launches):
            out = compiled(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / (launches * copies))
    med, low, spread = _summary(samples)
    return Timing(med, low, spread, launches, n, "wall")


def cupti_measure() -> Measure:
    """jax's CUPTI profiler (``jax.experimental.mosaic.gpu.profiler.measure``)."""
    from jax.experimental.mosaic.gpu import profiler

    return profiler.measure  # type: ignore[no-any-return]


def kernel_breakdown(iterations: Sequence[Sequence[tuple[str, float]]]) -> list[dict[str, Any]]:
    """Per kernel name: launches per program and median microseconds per program, longest first.

    ``iterations``: per program execution, its kernels in launch order as ``(name, milliseconds)``."""
    names = list(dict.fromkeys(name for it in iterations for name, _ in it))
    rows = []
    for name in names:
        per_iter = [sum(ms for n, ms in it if n == name) for it in iterations]
        launches = sum(1 for n, _ in iterations[0] if n == name)
        rows.append(
            {"name": name[:NAME_CHARS], "launches": launches, "us": 1e3 * statistics.median(per_iter)}
        )
    return sorted(rows, key=lambda r: -r["us"])


def time_device(
    compiled: Callable[..., Any],
    args: Sequence[Any],
    copies: int,
    repeats: int,
    measure: Measure | None = None,
) -> Timing:
    """Median per-call seconds of ``compiled(*args)`` (``copies`` calls) from CUPTI kernel durations.

    ``measure`` defaults to :func:`cupti_measure`'s (tests pass a stand-in)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    measure = measure or cupti_measure()
    _, timings = measure(compiled, aggregate=False, iterations=repeats)(*args)
    iterations = [] if not timings else [timings] if repeats == 1 else list(timings)
    if not iterations or not all(iterations):
        raise RuntimeError("CUPTI recorded no kernel: the program ran nothing on the GPU")
    samples = [sum(ms for _, ms in it) * 1e-3 / copies for it in iterations]
    if min(samples) <= 0:
        raise RuntimeError(f"CUPTI recorded a zero-length program execution: {iterations[0]}")
    med, low, spread = _summary(samples)
    return Timing(med, low, spread, 1, len(samples), "device", kernel_breakdown(iterations))


def device_clock_problem(platform: str, measure: Measure | None = None) -> str | None:
    """Why the device clock cannot time programs here, or ``None`` if it can (a tiny program is
    timed to find out, on a GPU only)."""
    if platform != "gpu":
        return f"the device clock (CUPTI) needs a GPU; this is {platform!r}"
    try:
        x = jax.numpy.ones((8, 128), jax.numpy.float32)
        compiled = jax.jit(lambda a: (a * 2.0).sum()).lower(x).compile()
        time_device(compiled, (x,), 1, 2, measure)
    except Exception as e:  # the reason goes into the results, then the wall clock is used
        text = str(e).splitlines()[0][:200] if str(e) else ""
        return f"CUPTI failed: {type(e).__name__}: {text}"
    return None


def choose_clock(requested: str, platform: str, measure: Measure | None = None) -> tuple[str, str | None]:
    """The clock to use and, for ``auto`` falling back to the wall clock, why.

    ``auto``: the device clock where it works (a GPU with CUPTI), else the wall clock.
    ``device`` where it cannot work is an error that says why, raised before anything is timed."""
    if requested not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {requested!r}")
    if requested == "wall":
        return "wall", None
    problem = device_clock_problem(platform, measure)
    if problem is None:
        return "device", None
    if requested == "device":
        raise ValueError(f"--clock device: {problem}. Use --clock wall (or auto).")
    return "wall", problem


def add_clock_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--clock`` option of the kernel experiments."""
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default="auto",
        help="device: CUPTI kernel durations (GPU); wall: perf_counter; auto (default): device if it works",
    )


def resolve_clock(requested: str, fail: Callable[[str], NoReturn]) -> tuple[str, str | None]:
    """:func:`choose_clock` on the default backend; a clock that cannot work goes to ``fail`` (a
    command line's error exit) with the reason."""
    try:
        return choose_clock(requested, jax.default_backend())
    except ValueError as e:
        fail(str(e))


def time_program(
    clock: str, compiled: Callable[..., Any], args: Sequence[Any], copies: int, repeats: int
) -> Timing:
    """Per-call time of ``compiled(*args)`` on ``clock`` (``"device"`` or ``"wall"``). A program
    the device clock fails on (CUPTI's records inconsistent between executions, say) is timed by the
    wall clock instead, with the reason in :attr:`Timing.note`: one program does not end a sweep,
    and its time says which clock measured it."""
    if clock == "device":
        try:
            return time_device(compiled, args, copies, repeats)
        except RuntimeError as e:
            t = time_wall(compiled, args, copies, repeats)
            t.note = f"device clock failed ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
            return t
    if clock == "wall":
        return time_wall(compiled, args, copies, repeats)
    raise ValueError(f"clock must be 'device' or 'wall' (resolve 'auto' with choose_clock), got {clock!r}")


METHODS = {
    "device": (
        "device time: the summed durations of the program's GPU kernels from CUPTI activity records "
        "(no launch gaps), one warm-up execution then one sample per execution"
    ),
    "wall": (
        "wall clock (time.perf_counter around jax.block_until_ready), L program executions back to back "
        "per sample, launch gaps included"
    ),
}


def describe(clock: str, fallback: str | None = None) -> str:
    """:data:`METHODS` of ``clock``, with why ``auto`` fell back to the wall clock if it did."""
    return METHODS[clock] + (f" (--clock auto fell back: {fallback})" if fallback else "")
