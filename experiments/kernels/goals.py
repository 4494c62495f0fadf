"""The kernels' speed goals, judged on the results of :mod:`experiments.kernels.bench`.

Goals (:data:`GOALS`, GPU sweeps only): W4A16 at M <= 16 at least 3x XLA's bf16 matmul, W8A8 and
FP8 at M >= 1024 at least 1.5x. Per goal and shape, the fastest of the goal's Pallas rows at each M
of its range (e.g. ``w4a16`` or ``w4a16-swap``, whichever wins there) and the slowest of those, which
meets the goal or not; then the same with XLA's own int8 / fp8 dot (the ``-xla`` rows) counted, in a
column apart, so the table says whether the Pallas kernels alone meet it.

``bench_kernels`` judges its own sweep. This module's command judges results files written by it,
several at once when one device's rows were measured in separate processes (the Mosaic GPU rows
apart from the Triton ones, as ``scripts/device_kernels.sh`` runs them). Every speedup stays the
one measured in its own file, against that file's own bf16 baseline; the files are only pooled, so
the best row at an M may come from either file. A (kernel, shape, M) cell measured in two files is
refused, as are files of different devices or of another backend::

    python -m experiments.kernels.goals runs/device_kernels/bench.json runs/device_kernels/bench_mgpu.json \\
        --md runs/device_kernels/goals.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

BASELINE = "bf16"  # the row every speedup divides (bench_kernels.BASELINE)


class Goal(NamedTuple):
    """A speed goal: the best of ``rows`` at least ``target`` times XLA's bf16 matmul at every M of
    ``[m_min, m_max]`` on every shape; ``xla_rows`` (XLA's own low-precision dot) are judged apart,
    so the table says whether the Pallas kernels alone meet it."""

    name: str
    rows: tuple[str, ...]
    xla_rows: tuple[str, ...]
    m_min: int
    m_max: int | None
    target: float

    def label(self) -> str:
        span = f"M <= {self.m_max}" if self.m_min <= 1 else f"M >= {self.m_min}"
        return f"{self.name} at {span} >= {self.target:g}x bf16"

    def covers(self, m: int) -> bool:
        return m >= self.m_min and (self.m_max is None or m <= self.m_max)


GOALS = (
    Goal("W4A16", ("w4a16", "w4a16-swap", "w4a16-mgpu"), (), 1, 16, 3.0),
    Goal("W8A8", ("w8a8", "w8a8-nk", "w8a8-mgpu"), ("w8a8-xla",), 1024, None, 1.5),
    Goal("FP8", ("fp8", "fp8-nk", "fp8-mgpu"), ("fp8-xla",), 1024, None, 1.5),
)


def _worst_of_best(cells: Sequence[dict[str, Any]], rows: Sequence[str]) -> dict[str, Any] | None:
    """Over the Ms of ``cells``: the fastest of ``rows`` at each M, and the M where that is slowest."""
    best: dict[int, tuple[float, str]] = {}
    for c in cells:
        if c["kernel"] in rows and c.get("speedup") is not None:
            best[c["m"]] = max(best.get(c["m"], (0.0, "")), (c["speedup"], c["kernel"]))
    if not best:
        return None
    worst_m = min(best, key=lambda m: best[m][0])
    return {
        "best": {m: {"kernel": k, "speedup": v} for m, (v, k) in sorted(best.items())},
        "worst": best[worst_m][0],
        "worst_m": worst_m,
    }


def judge(backend: str, shapes: Sequence[str], cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per goal of :data:`GOALS` and shape with measured cells in the goal's M range: the best Pallas
    row at each M, the worst of those (the goal is met on the shape if it reaches the target), and
    the same with XLA's own low-precision dot counted (``None`` where that dot was not measured).
    The goals are GPU goals: none for a sweep on another backend (the reference path or the
    interpreter measure no Pallas kernel on a GPU)."""
    out: list[dict[str, Any]] = []
    if backend != "gpu":
        return out
    for goal in GOALS:
        for name in shapes:
            in_range = [c for c in cells if c["shape"] == name and goal.covers(c["m"])]
            pallas = _worst_of_best(in_range, goal.rows)
            if pallas is None:
                continue
            xla_measured = any(c["kernel"] in goal.xla_rows for c in in_range)
            with_xla = _worst_of_best(in_range, goal.rows + goal.xla_rows) if xla_measured else None
            out.append(
                {
                    "goal": goal.label(),
                    "shape": name,
                    "target": goal.target,
                    "pallas": pallas,
                    "met": pallas["worst"] >= goal.target,
                    "with_xla": with_xla,
                    "met_with_xla": None if with_xla is None else with_xla["worst"] >= goal.target,
                }
            )
    return out


def best_text(result: dict[str, Any]) -> str:
    return "; ".join(f"M={m}: {b['kernel']} {b['speedup']:.2f}x" for m, b in result["best"].items())


def text(rows: Sequence[dict[str, Any]]) -> str:
    """The judged goals, one line per (goal, shape); empty if none was measured."""
    lines = ["against the goals (the best row at each M; the worst M decides):"]
    for r in rows:
        p, x = r["pallas"], r["with_xla"]
        line = (
            f"  {r['goal']}, {r['shape']}: Pallas {p['worst']:.2f}x at M={p['worst_m']} "
            f"{'met' if r['met'] else 'NOT met'} ({best_text(p)})"
        )
        if x is not None:
            line += f"; with XLA's dot {x['worst']:.2f}x {'met' if r['met_with_xla'] else 'NOT met'}"
        lines.append(line)
    return "\n".join(lines) if rows else ""


def markdown_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The judged goals as a markdown table (no lines if none was measured)."""
    if not rows:
        return []
    lines = [
        "Against the goals (the fastest row at each M; the slowest of those decides; the XLA column "
        "counts XLA's own int8 / fp8 dot too):",
        "",
        "| goal | shape | Pallas rows: fastest at each M | worst | met | with XLA's dot: worst | met |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for r in rows:
        p, x = r["pallas"], r["with_xla"]
        xla_cols = "- | -" if x is None else f"{x['worst']:.2f}x | {'yes' if r['met_with_xla'] else 'no'}"
        lines.append(
            f"| {r['goal']} | {r['shape']} | {best_text(p)} | {p['worst']:.2f}x | "
            f"{'yes' if r['met'] else 'no'} | {xla_cols} |"
        )
    return lines


def json_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The judged goals with their per-M keys as strings (JSON object keys)."""

    def str_keys(result: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if result is None else {**result, "best": {str(m): b for m, b in result["best"].items()}}

    return [{**r, "pallas": str_keys(r["pallas"]), "with_xla": str_keys(r["with_xla"])} for r in rows]


class Pooled(NamedTuple):
    """The cells of one device's results files, pooled."""

    device: str
    shapes: tuple[str, ...]
    cells: tuple[dict[str, Any], ...]


def _fail(message: str) -> SystemExit:
    return SystemExit(f"bench_goals: {message}")


def pool(paths: Sequence[pathlib.Path]) -> Pooled:
    """The cells of ``bench_kernels`` results files of one device and the GPU backend; refused
    (with the file and the fix named) before anything is judged otherwise."""
    first: tuple[str, pathlib.Path] | None = None  # the device of the first file, and that file
    shapes: dict[str, None] = {}
    cells: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, int], pathlib.Path] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise _fail(f"cannot read {path} as JSON ({e}); pass the --out file of bench_kernels") from e
        meta = data.get("meta") if isinstance(data, dict) else None
        if not isinstance(meta, dict) or not isinstance(data.get("cells"), list):
            raise _fail(
                f"{path} is not a bench_kernels results file (no 'meta' and 'cells'); pass its --out file"
            )
        if meta.get("backend") != "gpu":
            raise _fail(
                f"{path} was measured with backend {meta.get('backend')!r}; the goals are GPU goals, "
                "judged on GPU sweeps only"
            )
        device = str(meta.get("device_kind"))
        first = first or (device, path)
        if device != first[0]:
            raise _fail(
                f"{first[1]} was measured on {first[0]} and {path} on {device}; "
                "judge one device's files together"
            )
        shapes.update(dict.fromkeys(meta.get("shapes", {})))
        for c in data["cells"]:
            key = (c["kernel"], c["shape"], c["m"])
            if c["kernel"] != BASELINE and key in seen:
                raise _fail(
                    f"{key[0]} on {key[1]} at M={key[2]} is in both {seen[key]} and {path}; files pooled "
                    "must measure different rows (judge runs of the same rows one at a time)"
                )
            seen[key] = path
            cells.append(c)
    if first is None:
        raise _fail("no results file given")
    return Pooled(first[0], tuple(shapes), tuple(cells))


def report(device: str, rows: Sequence[dict[str, Any]], paths: Sequence[pathlib.Path]) -> str:
    """The markdown page of the goals ``rows`` judged on ``paths``."""
    judged_on = ", ".join(f"`{p}`" for p in paths)
    lines = [f"# Kernel goals: {device}", "", f"Judged on {judged_on}.", ""]
    lines += markdown_lines(rows) or ["No cell of these files falls in a goal's M range."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("results", nargs="+", type=pathlib.Path, help="bench_kernels --out files of one device")
    p.add_argument("--md", type=pathlib.Path, help="also write the goals as a markdown page here")
    p.add_argument("--json", type=pathlib.Path, help="also write the judged goals as JSON here")
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="judge the files that exist (a benchmark cut before its first shape wrote none)",
    )
    args = p.parse_args(argv)
    files = list(args.results)
    if args.skip_missing:
        missing = [f for f in files if not f.exists()]
        files = [f for f in files if f.exists()]
        if missing:
            print("skipped (missing): " + ", ".join(map(str, missing)))
        if not files:
            raise _fail("none of the results files exists (--skip-missing)")
    pooled = pool(files)
    rows = judge("gpu", pooled.shapes, pooled.cells)
    print(f"{pooled.device}: {len(pooled.cells)} cells from {len(files)} file(s)")
    print(text(rows) or "no cell of these files falls in a goal's M range")
    if args.md is not None or args.json is not None:
        from experiments.records import write_atomic, write_json

        if args.md is not None:
            write_atomic(args.md, report(pooled.device, rows, files))
        if args.json is not None:
            write_json(
                args.json,
                {"device": pooled.device, "files": [str(f) for f in files], "goals": json_rows(rows)},
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
