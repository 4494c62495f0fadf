"""``results.png`` of ``qjax-report``: the pivot's tables as one figure, one subplot per table.

Each subplot draws the metric against the row labels, one series per column label, error bars = the
sample std of the cell (none for n < 2), cells without a value left out. Kinds
(:class:`~experiments.sweep.schema.Plot`):

* ``line``: markers joined by lines; the x axis is numeric when every row label is a number (bits),
  else the rows in table order; series dodged a little so that error bars at one x stay apart;
* ``point``: the same markers and error bars, not joined (categorical rows);
* ``bar``: grouped bars, which start at 0 (a bar's length is its value), so differences of a few
  points are hard to see;
* ``auto``: ``line`` when the rows are one numeric key, else ``point``.

``line`` and ``point`` share one y range over all subplots, zoomed to the data
(:func:`y_limits`): the lowest ``mean - std`` to the highest ``mean + std``, widened by
:data:`MARGIN` of that span on each side, so that differences of a point or two stay visible.
Matplotlib's Agg canvas, no pyplot state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from experiments.sweep.pivot import Pivot, Table, as_number, describe
from experiments.sweep.schema import Plot

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn, not with the sweep runner
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MARGIN = 0.05
MAX_PLOT_COLUMNS = 3


def plot_kind(p: Pivot) -> Plot:
    """``p.config.plot``, with ``auto`` resolved: ``line`` for rows of one numeric key, else ``point``."""
    if p.config.plot != Plot.AUTO:
        return Plot(p.config.plot)
    return Plot.LINE if numeric_rows(p) else Plot.POINT


def numeric_rows(p: Pivot) -> bool:
    """Whether the rows are one key whose labels are all numbers."""
    labels = [row for t in p.tables for row in t.rows]
    return len(p.config.rows) == 1 and all(as_number(row[0]) is not None for row in labels)


def y_limits(low: Sequence[float], high: Sequence[float], margin: float = MARGIN) -> tuple[float, float]:
    """``(min(low) - d, max(high) + d)`` with ``d = margin * (max(high) - min(low))``; a zero span
    widens by ``margin * |value|`` (``margin`` if the value is 0). Non-finite values are ignored."""
    lo = min((x for x in low if math.isfinite(x)), default=0.0)
    hi = max((x for x in high if math.isfinite(x)), default=1.0)
    span = hi - lo if hi > lo else (abs(hi) or 1.0)
    return lo - margin * span, hi + margin * span


def _series(table: Table, column: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keep, mean, std)`` of a column over the table's rows; ``keep``: the rows with a value."""
    stats = [table.stats[(row, column)] for row in table.rows]
    keep = np.array([s.n > 0 for s in stats], dtype=bool)
    mean = np.array([s.mean for s in stats])
    std = np.nan_to_num(np.array([s.std for s in stats]))
    return keep, mean, std


def _draw(ax: Axes, p: Pivot, table: Table, kind: Plot, numeric: bool) -> bool:
    """One table into ``ax``; whether anything was drawn."""
    x = np.array([as_number(r[0]) for r in table.rows] if numeric else range(len(table.rows)), dtype=float)
    n = len(table.columns)
    width = 0.8 / max(n, 1)
    drawn = False
    for j, column in enumerate(table.columns):
        keep, mean, std = _series(table, column)
        if not keep.any():
            continue
        name = ", ".join(column)
        if kind == Plot.BAR:
            offset = (j - (n - 1) / 2) * width
            ax.bar(x[keep] + offset, mean[keep], width, yerr=std[keep], capsize=3, label=name)
        else:  # dodged a little so that error bars at the same x stay apart
            dodge = (j - (n - 1) / 2) * 0.03 * (float(np.ptp(x)) or 1.0)
            style = "-" if kind == Plot.LINE else "none"
            ax.errorbar(
                x[keep] + dodge,
                mean[keep],
                yerr=std[keep],
                marker="o",
                capsize=3,
                linestyle=style,
                label=name,
            )
        drawn = True
    ax.set_xticks(x, [", ".join(row) for row in table.rows])
    ax.set_xlabel(", ".join(p.config.rows))
    ax.set_ylabel(p.config.metric)
    ax.grid(True, axis="y", alpha=0.3)
    if p.split_keys:
        ax.set_title(describe(p.split_keys, table.split), fontsize="medium")
    if drawn:
        ax.legend(title=", ".join(p.config.columns), fontsize="small")
    return drawn


def figure(p: Pivot) -> Figure:
    """The figure of ``results.png``: one subplot per table, up to :data:`MAX_PLOT_COLUMNS` a row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kind = plot_kind(p)
    numeric = kind == Plot.LINE and numeric_rows(p)
    ncols = min(len(p.tables), MAX_PLOT_COLUMNS)
    nrows = math.ceil(len(p.tables) / ncols)
    fig = Figure(figsize=(6.4 if ncols == 1 else 5.0 * ncols, 4.2 if nrows == 1 else 3.8 * nrows), dpi=120)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(len(p.tables))]
    for ax, table in zip(axes, p.tables, strict=True):
        _draw(ax, p, table, kind, numeric)
    if kind != Plot.BAR:
        low, high = [], []
        for table in p.tables:
            for column in table.columns:
                keep, mean, std = _series(table, column)
                low += list((mean - std)[keep])
                high += list((mean + std)[keep])
        for ax in axes:
            ax.set_ylim(*y_limits(low, high))
    fig.suptitle(str(p.config.title))
    fig.tight_layout()
    return fig


def render_plot(p: Pivot) -> bytes:
    """``results.png``: :func:`figure` as PNG bytes."""
    buf = io.BytesIO()
    figure(p).savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
