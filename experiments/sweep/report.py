"""``qjax-report SWEEP_DIR``: tables and plots of a sweep, re-rendered from its ``results.jsonl``.

**Input.** ``SWEEP_DIR/results.jsonl``: one JSON record per cell (``cell``, ``axes``, ``status``,
``error``, ``metrics``, ``model``, ``layers``, ``protocol``, ``config``); a cell recorded more than
once (a failed cell retried) counts with its last record. How to pivot comes from, in order: the
command line, the ``report:`` block of ``SWEEP_DIR/sweep.yaml`` (the config as last run; ``report``
does not enter the cell hash, so it may change without rerunning), the records' resolved config,
:class:`experiments.sweep.schema.ReportConfig`'s defaults.

**Pivot.** ``rows`` and ``columns`` each name a sweep axis or a dotted config key: a record's value
is ``axes[key]`` if the sweep has that axis, else ``config[a][b]...`` for ``key = "a.b..."``. The
metric is ``metrics.<name>``, ``model.<name>`` (any dotted path into the record) or a bare
``<name>`` of ``metrics``. Each (row, column) cell aggregates the ``ok`` records that fall in it,
i.e. over every other axis (the seeds):

.. math::

    \\bar x = \\frac1n \\sum_i x_i, \\qquad s = \\sqrt{\\frac{1}{n-1} \\sum_i (x_i - \\bar x)^2}

(the sample standard deviation; undefined for :math:`n = 1`). ``n`` is shown where it is below the
largest number of records of any cell (a seed failed or has not run). Failed records are listed,
never averaged. Row and column values are ordered numerically when all of them are numbers (bits),
else in order of first appearance in the results (the grid's order: ``W8A8, W4A8, W2A8``).

**Outputs** in ``SWEEP_DIR``, each written atomically (temporary file, ``fsync``, ``os.replace``):

* ``results.md``: title, table ``mean ± std``, failed cells with their errors, how the results were
  produced (command, protocol: versions, git commit, device, dataset checksum, ...);
* ``results.csv``: long form ``row,column,mean,std,n`` (full precision; ``std`` empty for n < 2);
* ``results.png``: ``line`` (metric against rows, one line per column value, error bars = std) or
  ``bar`` (grouped bars with error bars); matplotlib's Agg canvas, no pyplot state;
* ``layers.md``: per-layer ``weight SQNR / output SQNR`` in dB, mean over the records of each cell,
  for the first :data:`MAX_LAYER_ROWS` row values.

Every output is rendered in memory before any file is written, so a failure leaves all old files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from experiments import records
from experiments.records import write_atomic
from experiments.sweep.config import config_differences, flatten, normalized_config
from experiments.sweep.schema import Plot, ReportConfig

RESULTS = "results.jsonl"
MAX_LAYER_ROWS = 4
PLOTS = tuple(p.value for p in Plot)
_PROTOCOL_FIRST = ("command", "qjax", "jax", "flax", "git_commit", "device", "dataset", "dataset_sha256")
_PROTOCOL_PER_CELL = ("config_hash", "seed")


class ReportError(ValueError):
    """The results cannot be reported as asked (missing file, unknown key or metric)."""


# -- reading ---------------------------------------------------------------------------------------


def load_results(sweep_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``sweep_dir/results.jsonl``, the last one of each ``cell`` label, in file order."""
    path = pathlib.Path(sweep_dir) / RESULTS
    if not path.is_file():
        raise ReportError(f"{path} not found: run the sweep first (qjax-run CONFIG) or pass its directory")
    try:
        results = records.read_results(pathlib.Path(sweep_dir))
    except records.ResultsError as e:
        raise ReportError(str(e)) from None
    by_cell: dict[str, dict[str, Any]] = {}
    for record in results:
        label = str(record["cell"])
        by_cell.pop(label, None)  # a retried cell moves to where its last record is
        by_cell[label] = record
    if not by_cell:
        raise ReportError(f"{path} holds no records yet")
    return list(by_cell.values())


def _dotted(data: Any, key: str) -> Any:
    node = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def lookup(record: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` for a record: its sweep axis ``key``, else the dotted config key."""
    axes = record.get("axes") or {}
    if key in axes:
        return axes[key]
    try:
        return _dotted(record.get("config") or {}, key)
    except KeyError:
        raise ReportError(
            f"{key!r} is neither an axis of the sweep ({', '.join(sorted(axes)) or 'none'}) nor a config "
            f"key of cell {record.get('cell')!r}; use an axis name or a dotted key such as 'method.name'"
        ) from None


def metric_value(record: Mapping[str, Any], metric: str) -> float:
    """``metric`` of a record: a dotted path into it (``metrics.accuracy``, ``model.size_bytes``) or a
    bare name in ``metrics``."""
    key = metric if "." in metric else f"metrics.{metric}"
    try:
        value = _dotted(record, key)
    except KeyError:
        have = sorted(record.get("metrics") or {})
        raise ReportError(
            f"metric {metric!r} is not in the record of cell {record.get('cell')!r} (metrics: "
            f"{', '.join(have) or 'none'}); use e.g. 'accuracy', 'metrics.loss' or 'model.size_bytes'"
        ) from None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ReportError(f"metric {metric!r} of cell {record.get('cell')!r} is {value!r}, not a number")
    return float(value)


# -- the pivot -------------------------------------------------------------------------------------


def label(value: Any) -> str:
    """A row or column label: strings as they are, numbers as written, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return json.dumps(value, sort_keys=True)


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a number or a numeric string (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def ordered(values: Sequence[Any]) -> list[str]:
    """Distinct labels of ``values``: numerically sorted if all are numbers, else by first appearance."""
    first: dict[str, Any] = {}
    for v in values:
        first.setdefault(label(v), v)
    numbers = {k: _number(v) for k, v in first.items()}
    if all(n is not None for n in numbers.values()):
        return sorted(first, key=lambda k: float(numbers[k] or 0.0))
    return list(first)


@dataclasses.dataclass(frozen=True)
class Stat:
    """One (row, column) cell: its metric values (``ok`` records), their mean and sample std (NaN for
    n < 2), the ``ok`` records themselves and the number of failed ones."""

    values: tuple[float, ...]
    records: tuple[dict[str, Any], ...]
    failed: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan


@dataclasses.dataclass(frozen=True)
class Pivot:
    """The aggregated table: ``stats[(row, column)]`` for each row and column label; ``failed``: one
    ``{cell, row, column, error}`` per failed record; ``expected``: most records in any cell."""

    config: ReportConfig
    rows: list[str]
    columns: list[str]
    stats: dict[tuple[str, str], Stat]
    failed: list[dict[str, Any]]
    expected: int
    other_axes: list[str]
    records: list[dict[str, Any]]


def pivot(records: Sequence[dict[str, Any]], config: ReportConfig) -> Pivot:
    """Aggregate ``records`` by ``config.rows`` x ``config.columns`` (see the module docstring)."""
    rows = ordered([lookup(r, config.rows) for r in records])
    columns = ordered([lookup(r, config.columns) for r in records])
    ok: dict[tuple[str, str], list[dict[str, Any]]] = {(r, c): [] for r in rows for c in columns}
    failed = []
    for record in records:
        key = (label(lookup(record, config.rows)), label(lookup(record, config.columns)))
        if record.get("status") == "ok":
            ok[key].append(record)
        else:
            failed.append(
                {"cell": record.get("cell"), "row": key[0], "column": key[1], "error": record.get("error")}
            )
    for key, rs in ok.items():
        _check_pooled(key, rs)
    n_failed = {key: sum(1 for f in failed if (f["row"], f["column"]) == key) for key in ok}
    stats = {
        key: Stat(tuple(metric_value(r, config.metric) for r in rs), tuple(rs), n_failed[key])
        for key, rs in ok.items()
    }
    axes = dict.fromkeys(k for r in records for k in (r.get("axes") or {}))
    other = [a for a in axes if a not in (config.rows, config.columns)]
    expected = max(s.n + s.failed for s in stats.values())
    return Pivot(config, rows, columns, stats, failed, expected, other, list(records))


def _check_pooled(key: tuple[str, str], records: Sequence[Mapping[str, Any]]) -> None:
    """The records averaged in one table cell may differ only in sweep axes (e.g. ``seed``):
    records of configs that differ elsewhere (a rerun with another override into the same
    directory) are never pooled."""
    for other in records[1:]:
        axes = [*(records[0].get("axes") or {}), *(other.get("axes") or {})]
        diff = config_differences(normalized_config(records[0]), normalized_config(other), axes)
        if diff:
            shown = ", ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in diff[:4])
            raise ReportError(
                f"cell {key[0]} / {key[1]} would average records of different configs "
                f"({records[0].get('cell')!r} and {other.get('cell')!r} differ in {shown}), which no "
                "sweep axis names; report them apart (rows=/columns= on that key) or rerun one of them "
                "into its own output_dir"
            )


def report_config(
    sweep_dir: pathlib.Path, records: Sequence[Mapping[str, Any]], **overrides: str | None
) -> ReportConfig:
    """The :class:`ReportConfig` to render with: ``overrides`` (not None) over ``sweep.yaml``'s
    ``report:`` over the first record's ``config.report`` over the defaults."""
    fields = {f.name for f in dataclasses.fields(ReportConfig)}
    merged: dict[str, Any] = {}
    for record in records:
        if isinstance((record.get("config") or {}).get("report"), Mapping):
            merged.update(record["config"]["report"])
            break
    sweep_yaml = sweep_dir / "sweep.yaml"
    if sweep_yaml.is_file():
        raw = yaml.safe_load(sweep_yaml.read_text()) or {}
        if isinstance(raw.get("report"), Mapping):
            merged.update(raw["report"])
        if merged.get("title") is None and raw.get("name"):
            merged["title"] = raw["name"]
    merged.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ReportConfig(**{k: v for k, v in merged.items() if k in fields})
    if cfg.plot not in PLOTS:
        raise ReportError(f"report.plot={cfg.plot!r} is not one of {list(PLOTS)}")
    cfg = dataclasses.replace(cfg, plot=Plot(cfg.plot))
    if cfg.title is None:
        name = next((r["config"].get("name") for r in records if isinstance(r.get("config"), Mapping)), None)
        cfg = dataclasses.replace(cfg, title=str(name or sweep_dir.name))
    return cfg


# -- rendering -------------------------------------------------------------------------------------


def paired_differences(p: Pivot, baseline: str) -> dict[tuple[str, str], tuple[float, ...]]:
    """Per row and non-baseline column, the differences ``x[column] - x[baseline]`` of records that
    agree on every other axis (the seeds): one per matched pair, in the order of the cell's records."""
    if baseline not in p.columns:
        raise ReportError(f"report.baseline={baseline!r} is not a column; the columns are {p.columns}")

    def key(record: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(label((record.get("axes") or {}).get(a)) for a in p.other_axes)

    out = {}
    for row in p.rows:
        ref = p.stats[(row, baseline)]
        base = {key(r): v for r, v in zip(ref.records, ref.values, strict=True)}
        for column in p.columns:
            if column == baseline:
                continue
            stat = p.stats[(row, column)]
            out[(row, column)] = tuple(
                v - base[key(r)] for r, v in zip(stat.records, stat.values, strict=True) if key(r) in base
            )
    return out


def _paired_table(p: Pivot, baseline: str) -> list[str]:
    diffs = paired_differences(p, baseline)
    columns = [c for c in p.columns if c != baseline]

    def cell(d: tuple[float, ...]) -> str:
        if not d:
            return "-"
        mean = float(np.mean(d))
        text = f"{mean:+.4f}"
        if len(d) > 1:
            text += f" ± {float(np.std(d, ddof=1)):.4f}"
        return text + f" ({sum(x > 0 for x in d)}/{len(d)} > 0)"

    over = ", ".join(p.other_axes) if p.other_axes else "repeated cells"
    lines = [
        "",
        f"## Difference to `{baseline}`, paired by {over}",
        "",
        f"`{p.config.metric}[column] - {p.config.metric}[{baseline}]` for records that agree on {over}: "
        "mean ± sample std of the differences, and how many are above zero.",
        "",
    ]
    return lines + _table(
        [f"{p.config.rows} \\ {p.config.columns}", *columns],
        ([row, *(cell(diffs[(row, c)]) for c in columns)] for row in p.rows),
    )


def format_number(x: float, digits: int = 4) -> str:
    """``x`` with about ``digits`` significant digits, as a fixed-point number (``inf``, ``nan`` as such)."""
    if not math.isfinite(x):
        return str(x)
    magnitude = math.floor(math.log10(abs(x))) + 1 if x != 0 else 1
    decimals = min(max(digits - magnitude, 0), 8)
    return f"{x:.{decimals}f}"


def format_stat(stat: Stat, expected: int) -> str:
    """``mean ± std`` (std with as many decimals as the mean), ``(n=k)`` when below ``expected``."""
    if stat.n == 0:
        return "failed" if stat.failed else "-"
    mean = format_number(stat.mean)
    text = mean
    if stat.n > 1:
        decimals = len(mean.partition(".")[2])
        text += f" ± {stat.std:.{decimals}f}"
    return text + (f" (n={stat.n})" if stat.n < expected else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(p: Pivot, sweep_dir: pathlib.Path, command: str) -> str:
    """``results.md``: title, table, failed cells, how it was produced."""
    cfg = p.config
    over = ", ".join(p.other_axes) if p.other_axes else "repeated cells"
    lines = [f"# {cfg.title}", ""]
    lines.append(
        f"`{cfg.metric}`, mean ± sample std over {over} ({p.expected} per cell; `n` shown where fewer "
        f"finished). Rows: `{cfg.rows}`, columns: `{cfg.columns}`."
    )
    lines.append("")
    body = ([row, *(format_stat(p.stats[(row, c)], p.expected) for c in p.columns)] for row in p.rows)
    lines += _table([f"{cfg.rows} \\ {cfg.columns}", *p.columns], body)
    if cfg.baseline is not None:
        lines += _paired_table(p, cfg.baseline)
    if p.failed:
        lines += ["", f"## Failed cells ({len(p.failed)})", ""]
        for f in p.failed:
            error = str(f["error"] or "no error recorded").splitlines()[0]
            lines.append(f"- `{f['cell']}` ({cfg.rows}={f['row']}, {cfg.columns}={f['column']}): {error}")
    lines += ["", "## Protocol", "", f"- rendered with: `{command}`"]
    if (sweep_dir / "sweep.yaml").is_file():
        lines.append(
            f"- config: `sweep.yaml` here; `qjax-run {sweep_dir / 'sweep.yaml'} output_dir=<new dir>` "
            "runs it again from scratch"
        )
    lines += [f"- {key}: {value}" for key, value in protocol_summary(p.records)]
    return "\n".join(lines) + "\n"


def protocol_summary(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(key, value)`` lines describing the ``protocol`` of the ok records: a value shared by all of
    them as it is, up to 3 distinct values joined, more counted; ``wall_time_s`` summed."""
    flat = [flatten(r.get("protocol") or {}) for r in records if r.get("status") == "ok"]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    keys = [k for k in _PROTOCOL_FIRST if k in keys] + [k for k in keys if k not in _PROTOCOL_FIRST]
    lines = []
    for key in keys:
        if key in _PROTOCOL_PER_CELL:
            continue
        values = [f[key] for f in flat if key in f]
        if key == "wall_time_s" and all(isinstance(v, int | float) for v in values):
            lines.append((key, f"{sum(values):.1f} in total over {len(values)} cells"))
            continue
        distinct = list(dict.fromkeys(v if isinstance(v, str) else json.dumps(v) for v in values))
        text = ", ".join(f"`{v}`" for v in distinct)
        text = text if len(distinct) <= 3 else f"{len(distinct)} distinct values"
        lines.append((key, text))
    return lines


def render_csv(p: Pivot) -> str:
    """``results.csv``: ``row,column,mean,std,n``, one line per (row, column), full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "column", "mean", "std", "n"])
    for row in p.rows:
        for column in p.columns:
            s = p.stats[(row, column)]
            cell = lambda x: repr(x) if not math.isnan(x) else ""
            writer.writerow([row, column, cell(s.mean), cell(s.std), s.n])
    return buf.getvalue()


def render_plot(p: Pivot) -> bytes:
    """``results.png``: a line or grouped-bar plot of the table, error bars = sample std."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg = p.config
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    numbers = [_number(r) for r in p.rows]
    numeric = cfg.plot == Plot.LINE and all(n is not None for n in numbers)
    x = np.array(numbers if numeric else range(len(p.rows)), dtype=float)
    width = 0.8 / max(len(p.columns), 1)
    drawn = False
    for j, column in enumerate(p.columns):
        stats = [p.stats[(row, column)] for row in p.rows]
        keep = np.array([s.n > 0 for s in stats])
        if not keep.any():
            continue
        mean = np.array([s.mean for s in stats])[keep]
        err = np.nan_to_num(np.array([s.std for s in stats]))[keep]
        if cfg.plot == Plot.LINE:  # dodged a little so that error bars at the same x stay apart
            dodge = (j - (len(p.columns) - 1) / 2) * 0.03 * (float(np.ptp(x)) or 1.0)
            ax.errorbar(x[keep] + dodge, mean, yerr=err, marker="o", capsize=3, label=column)
        else:
            offset = (j - (len(p.columns) - 1) / 2) * width
            ax.bar(x[keep] + offset, mean, width, yerr=err, capsize=3, label=column)
        drawn = True
    ax.set_xticks(x, p.rows)
    ax.set_xlabel(cfg.rows)
    ax.set_ylabel(cfg.metric)
    ax.set_title(str(cfg.title))
    ax.grid(True, axis="y", alpha=0.3)
    if drawn:
        ax.legend(title=cfg.columns, fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _layer_cell(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """``weight / output`` SQNR of layer ``path``, each the mean of its numeric values, ``-`` if none."""
    rows = [layer for r in records for layer in (r.get("layers") or []) if layer.get("path") == path]
    parts = []
    for key in ("weight_sqnr_db", "output_sqnr_db"):
        values = [float(row[key]) for row in rows if isinstance(row.get(key), int | float)]
        parts.append(format_number(float(np.mean(values)), 3) if values else "-")
    return " / ".join(parts) if rows else "-"


def render_layers(p: Pivot) -> str:
    """``layers.md``: per-layer ``weight / output`` SQNR (dB), mean over each cell's records."""
    cfg = p.config
    lines = [
        f"# {cfg.title}: per-layer SQNR",
        "",
        "`weight SQNR / output SQNR` in dB (each layer's own output error on the float input), mean over "
        "the finished records of each cell; `-`: not applicable.",
    ]
    shown = 0
    for row in p.rows:
        if shown == MAX_LAYER_ROWS:
            lines += ["", f"({len(p.rows) - shown} more `{cfg.rows}` values not shown.)"]
            break
        cells = {c: p.stats[(row, c)].records for c in p.columns}
        cells = {c: rs for c, rs in cells.items() if any(r.get("layers") for r in rs)}
        if not cells:
            continue
        paths = list(
            dict.fromkeys(
                layer["path"] for rs in cells.values() for r in rs for layer in (r.get("layers") or [])
            )
        )
        lines += ["", f"## {cfg.rows} = {row}", ""]
        lines += _table(
            ["layer", *cells], ([path, *(_layer_cell(rs, path) for rs in cells.values())] for path in paths)
        )
        shown += 1
    if shown == 0:
        lines += ["", "No per-layer diagnostics in these results (float cells only, or all failed)."]
    return "\n".join(lines) + "\n"


# -- writing ---------------------------------------------------------------------------------------


def render(
    sweep_dir: str | os.PathLike[str],
    *,
    metric: str | None = None,
    rows: str | None = None,
    columns: str | None = None,
    plot: str | None = None,
    baseline: str | None = None,
    command: str | None = None,
) -> dict[str, pathlib.Path]:
    """Render ``results.md``, ``results.csv``, ``results.png`` and ``layers.md`` into ``sweep_dir``.

    The keyword arguments override the report config (see the module docstring); ``command`` is the
    command line recorded in ``results.md`` (default: ``qjax-report SWEEP_DIR``). Returns the paths.
    """
    root = pathlib.Path(sweep_dir)
    records = load_results(root)
    cfg = report_config(
        root, records, metric=metric, rows=rows, columns=columns, plot=plot, baseline=baseline
    )
    p = pivot(records, cfg)
    outputs = {
        "results.md": render_markdown(p, root, command or f"qjax-report {root}").encode(),
        "results.csv": render_csv(p).encode(),
        "results.png": render_plot(p),
        "layers.md": render_layers(p).encode(),
    }
    paths = {}
    for name, data in outputs.items():
        paths[name] = root / name
        write_atomic(paths[name], data)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``qjax-report SWEEP_DIR [--metric M] [--rows K] [--columns K] [--plot line|bar] [--baseline C]``."""
    parser = argparse.ArgumentParser(
        prog="qjax-report", description="Re-render a sweep's tables and plots from its results.jsonl."
    )
    parser.add_argument("sweep_dir", help="the sweep directory, e.g. runs/ptq_vs_qat")
    parser.add_argument(
        "--metric", help="metric in the cells: 'accuracy', 'metrics.loss', 'model.size_bytes'"
    )
    parser.add_argument("--rows", help="axis name or dotted config key of the rows, e.g. bits")
    parser.add_argument("--columns", help="axis name or dotted config key of the columns, e.g. method.name")
    parser.add_argument("--plot", choices=PLOTS, help="line or bar")
    parser.add_argument(
        "--baseline", help="a column label: add a table of per-seed differences to it, e.g. per-channel"
    )
    args = parser.parse_args(argv)
    command = " ".join(["qjax-report", *(argv if argv is not None else sys.argv[1:])])
    try:
        paths = render(
            args.sweep_dir,
            metric=args.metric,
            rows=args.rows,
            columns=args.columns,
            plot=args.plot,
            baseline=args.baseline,
            command=command,
        )
    except ReportError as e:
        parser.error(str(e))
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
