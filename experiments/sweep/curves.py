"""Training curves of a sweep for ``qjax-report``: ``curves.png`` and its section of ``results.md``.

**Input.** The records of ``results.jsonl`` and, for each, ``<run_dir>/metrics.jsonl``: the rows
:mod:`experiments.sweep.tracking` logged while the cell trained. A record whose cell has no such
file (a sweep run before tracking, a pretrained model that no phase trains, ``tracking.log_every:
0``) is left out and named in the section.

**Groups.** The records that differ only in the pooled axes (``seed`` and ``report.pool``) form a
group: the records that one cell of the report's table averages. Each group gets one colour.

**Plot.** One panel per training phase (``float``, then ``qat`` or ``finetune``), the training loss
against the step: a thin line per record, and for a group of several finished records a thick line
of their mean over the steps that all of them logged,

.. math::  \\bar\\ell_t = \\frac1n \\sum_{i=1}^n \\ell_{i,t}.

A failed record's line is dashed and stays out of the mean. The loss axis is logarithmic when the
losses are positive and span more than a factor of 20. Rendered on matplotlib's Agg canvas (no
pyplot state) into PNG bytes, which the report writes atomically with its other outputs.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.sweep import tracking

FILE = "curves.png"


@dataclasses.dataclass(frozen=True)
class Curves:
    """What the report writes: ``png`` (``None`` when no record has metrics) and the markdown
    section that links it (or says why there is none)."""

    png: bytes | None
    markdown: str


@dataclasses.dataclass(frozen=True)
class Curve:
    """The loss of one record in one phase, by step."""

    cell: str
    ok: bool
    steps: np.ndarray
    loss: np.ndarray


def group_label(record: Mapping[str, Any], pooled: Sequence[str]) -> str:
    """``axis=value, ...`` over the record's sweep axes that are not pooled (``all cells`` if none)."""
    axes = record.get("axes") or {}
    return ", ".join(f"{k}={v}" for k, v in axes.items() if k not in pooled) or "all cells"


def read_curves(
    records: Sequence[Mapping[str, Any]], sweep_dir: pathlib.Path, pooled: Sequence[str]
) -> tuple[dict[str, dict[str, list[Curve]]], list[str]]:
    """``{phase: {group label: [curve, ...]}}`` in order of first appearance, and the cells that
    have no metrics."""
    phases: dict[str, dict[str, list[Curve]]] = {}
    missing = []
    for record in records:
        rows = tracking.read_metrics(sweep_dir / str(record.get("run_dir", "")) / tracking.METRICS)
        rows = [r for r in rows if isinstance(r.get("loss"), int | float)]
        if not record.get("run_dir") or not rows:
            missing.append(str(record.get("cell")))
            continue
        label = group_label(record, pooled)
        for phase in dict.fromkeys(r["phase"] for r in rows):
            kept = tracking.phase_rows(rows, phase, until=2**62)
            curve = Curve(
                str(record.get("cell")),
                record.get("status") == "ok",
                np.array([r["step"] for r in kept]),
                np.array([float(r["loss"]) for r in kept]),
            )
            phases.setdefault(phase, {}).setdefault(label, []).append(curve)
    return phases, missing


def mean_curve(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray] | None:
    """The mean loss of the finished ``curves`` over the steps all of them logged (``None`` for
    fewer than two)."""
    done = [c for c in curves if c.ok]
    if len(done) < 2:
        return None
    steps = done[0].steps
    for c in done[1:]:
        steps = np.intersect1d(steps, c.steps)
    if not len(steps):
        return None
    return steps, np.mean([c.loss[np.searchsorted(c.steps, steps)] for c in done], axis=0)


def render_png(phases: Mapping[str, Mapping[str, Sequence[Curve]]], title: str) -> bytes:
    """``curves.png``: one panel per phase, one colour per group (see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(label for by_group in phases.values() for label in by_group))
    colour = {label: f"C{i % 10}" for i, label in enumerate(groups)}
    fig = Figure(figsize=(4.2 * len(phases) + 2.4, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(phases), squeeze=False)[0]
    handles: dict[str, Any] = {}
    for ax, (phase, by_group) in zip(axes, phases.items(), strict=True):
        losses = np.concatenate([c.loss for curves in by_group.values() for c in curves])
        for label, curves in by_group.items():
            several = len(curves) > 1
            for c in curves:
                (line,) = ax.plot(
                    c.steps,
                    c.loss,
                    color=colour[label],
                    linestyle="-" if c.ok else "--",
                    linewidth=0.8 if several else 1.6,
                    alpha=0.4 if several else 1.0,
                )
                handles.setdefault(label, line)
            mean = mean_curve(curves)
            if mean is not None:
                (handles[label],) = ax.plot(*mean, color=colour[label], linewidth=1.8)
        finite = losses[np.isfinite(losses)]
        if len(finite) and finite.min() > 0 and finite.max() > 20 * finite.min():
            ax.set_yscale("log")
        ax.set_title(phase)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.legend([handles[g] for g in groups], groups, loc="outside right upper", fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_curves(
    records: Sequence[Mapping[str, Any]],
    sweep_dir: str | pathlib.Path,
    *,
    pool: Sequence[str] = ("seed",),
    title: str | None = None,
) -> Curves:
    """The training curves of ``records`` (a sweep's results) read from under ``sweep_dir``,
    grouped over the ``pool`` axes: the PNG and the markdown section of ``results.md``."""
    root = pathlib.Path(sweep_dir)
    phases, missing = read_curves(records, root, pool)
    lines = ["", "## Training curves", ""]
    if phases:
        over = ", ".join(f"`{a}`" for a in pool) or "nothing"
        lines += [
            f"![training loss by step]({FILE})",
            "",
            "Training loss of every logged step (`cells/<slug>/metrics.jsonl`), one panel per phase, "
            f"one colour per group of cells that differ only in {over}: a thin line per cell and a thick "
            "line for the group's mean; failed cells dashed. Every logged metric (learning rate, "
            f"gradient norm, quantizer scales and clipping): `tensorboard --logdir {root}`.",
        ]
    if missing:
        shown = ", ".join(f"`{c}`" for c in missing[:8])
        shown += f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        lines += [
            "",
            f"{len(missing)} of {len(records)} cells have no training metrics (run before tracking, no "
            f"training phase, or `tracking.log_every: 0`) and are not shown: {shown}.",
        ]
    png = render_png(phases, title or root.name) if phases else None
    return Curves(png, "\n".join(lines) + "\n")
