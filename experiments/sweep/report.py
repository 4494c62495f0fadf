"""``qjax-report SWEEP_DIR``: tables and plots of a sweep, re-rendered from its ``results.jsonl``.

**Input.** ``SWEEP_DIR/results.jsonl``: one JSON record per cell (``cell``, ``axes``, ``status``,
``error``, ``metrics``, ``model``, ``layers``, ``protocol``, ``config``); a cell recorded more than
once (a failed cell retried) counts with its last record. How to pivot comes from, in order: the
command line, the ``report:`` block of ``SWEEP_DIR/sweep.yaml`` (the config as last run; ``report``
does not enter the cell hash, so it may change without rerunning), the records' resolved config,
:class:`experiments.sweep.schema.ReportConfig`'s defaults. A ``title`` belongs to the ``metric``
given with it and a ``baseline`` to the ``columns``: a later source that changes the metric
(the columns) without giving a title (a baseline) drops it; the title is then
``<sweep name>: <metric>``.

**Pivot** (:mod:`experiments.sweep.pivot`). ``rows`` and ``columns`` name one or more keys each
(``--rows quant.weights.dtype,method.name``): sweep axes or dotted config keys. A table cell
averages its records over the seeds (the axis ``seed``) and the axes named in ``pool``, nothing
else: any other axis that varies within a cell splits the report into one table per value
combination, under a heading that names the values (``--pool KEY`` averages over ``KEY`` instead,
and the caption says so). Each cell is

.. math::

    \\bar x = \\frac1n \\sum_i x_i, \\qquad s = \\sqrt{\\frac{1}{n-1} \\sum_i (x_i - \\bar x)^2}

(the sample standard deviation; undefined for :math:`n = 1`) over the ``n`` records of the cell
that have the metric. ``n`` is shown where it is below the largest number of records of any cell (a
seed failed, has not run, or has no value of the metric); a cell without a value shows ``-``
(``failed`` if its records failed). Failed records are listed, never averaged.

**Outputs** in ``SWEEP_DIR``, each written atomically (temporary file, ``fsync``, ``os.replace``):

* ``results.md``: title, caption (the metric, what is averaged, what splits the tables), one table
  ``mean ± std`` per split value (the row keys as its leading columns), failed cells with their
  errors, how the results were produced (command, protocol: versions, git commit, device, dataset
  checksum, ...);
* ``results.csv``: long form, one line per (split, row, column): the split, row and column keys,
  then ``mean,std,n`` (full precision; ``mean`` empty without a value, ``std`` empty for n < 2);
* ``results.png``: :mod:`experiments.sweep.plot`: one subplot per table, zoomed to the data;
* ``curves.png`` (:mod:`experiments.sweep.curves`): the training loss of every cell by step, one
  panel per phase, the seeds of each table cell in one colour (cells without ``metrics.jsonl`` are
  named in ``results.md``, which links it);
* ``layers.md``: per-layer ``weight SQNR / output SQNR`` in dB, mean over the records of each cell,
  for the first :data:`MAX_LAYER_ROWS` rows.

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
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from experiments.records import write_atomic
from experiments.sweep import validation
from experiments.sweep.config import flatten
from experiments.sweep.curves import render_curves
from experiments.sweep.pivot import (
    Label,
    Pivot,
    ReportError,
    Stat,
    Table,
    describe,
    load_results,
    paired_differences,
    pivot,
)
from experiments.sweep.plot import render_plot
from experiments.sweep.schema import Plot, ReportConfig

MAX_LAYER_ROWS = 4
PLOTS = tuple(p.value for p in Plot)
_PROTOCOL_FIRST = ("command", "qjax", "jax", "flax", "git_commit", "device", "dataset", "dataset_sha256")
_PROTOCOL_PER_CELL = ("config_hash", "seed")
_WRITTEN_FOR = {"title": "metric", "baseline": "columns"}  # a setting -> what it was written for


def _as_keys(value: Any) -> Any:
    """``"a, b"`` and ``["a", "b"]`` alike, to compare two ways of giving keys."""
    if isinstance(value, str):
        return validation.split_keys(value)
    return tuple(value) if isinstance(value, list | tuple) else value


def report_config(
    sweep_dir: pathlib.Path, records: Sequence[Mapping[str, Any]], **overrides: Any
) -> ReportConfig:
    """The :class:`ReportConfig` to render with: ``overrides`` (not None) over ``sweep.yaml``'s
    ``report:`` over the first record's ``config.report`` over the defaults; a title given with
    another metric than the one rendered, a baseline with other columns, are dropped (see the
    module docstring)."""
    first: Mapping[str, Any] = next(
        (r["config"] for r in records if isinstance(r.get("config"), Mapping)), {}
    )
    sweep_yaml = sweep_dir / "sweep.yaml"
    raw = (yaml.safe_load(sweep_yaml.read_text()) or {}) if sweep_yaml.is_file() else {}
    levels = [level for level in (first.get("report"), raw.get("report")) if isinstance(level, Mapping)]
    levels.append({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(ReportConfig)}
    merged: dict[str, Any] = {}
    for level in levels:
        for setting, basis in _WRITTEN_FOR.items():
            before = _as_keys(merged.get(basis, getattr(ReportConfig, basis)))
            if setting not in level and basis in level and _as_keys(level[basis]) != before:
                merged.pop(setting, None)
        merged.update({k: v for k, v in level.items() if k in fields})
    problems: validation.Problems = []
    cfg = typing.cast(ReportConfig, validation.build(ReportConfig, merged, "report", problems))
    if problems:
        raise ReportError("; ".join(f"{path}: {message}" for path, message in problems))
    for key in ("rows", "columns"):
        if not getattr(cfg, key):
            raise ReportError(f"report.{key} names no key; give at least one, e.g. --{key} method.name")
    if cfg.title is None:
        name = raw.get("name") or first.get("name") or sweep_dir.name
        cfg = dataclasses.replace(cfg, title=f"{name}: {cfg.metric}")
    return cfg


# -- results.md ------------------------------------------------------------------------------------


def format_number(x: float, digits: int = 4) -> str:
    """``x`` with about ``digits`` significant digits, as a fixed-point number (``inf``, ``nan`` as such)."""
    if not math.isfinite(x):
        return str(x)
    magnitude = math.floor(math.log10(abs(x))) + 1 if x != 0 else 1
    decimals = min(max(digits - magnitude, 0), 8)
    return f"{x:.{decimals}f}"


def format_stat(stat: Stat, expected: int) -> str:
    """``mean ± std`` (std with as many decimals as the mean), ``(n=k)`` when below ``expected``;
    ``-`` without a value (``failed`` when the cell's records failed)."""
    if stat.n == 0:
        return "failed" if stat.failed and not stat.missing else "-"
    mean = format_number(stat.mean)
    text = mean
    if stat.n > 1:
        decimals = len(mean.partition(".")[2])
        text += f" ± {stat.std:.{decimals}f}"
    return text + (f" (n={stat.n})" if stat.n < expected else "")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table with its columns padded to one width, so that it reads in a terminal too."""
    body = [list(row) for row in rows]
    widths = [max(3, *(len(cell) for cell in column)) for column in zip(header, *body, strict=True)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]


def _header(cfg: ReportConfig, columns: Sequence[Label]) -> list[str]:
    """The row keys (the last one ``\\ <column keys>``), then the column labels."""
    keys = list(cfg.rows)
    keys[-1] = f"{keys[-1]} \\ {', '.join(cfg.columns)}"
    return [*keys, *(", ".join(c) for c in columns)]


def _caption(p: Pivot) -> str:
    cfg, metric = p.config, f"`{p.config.metric}`"
    missing = any(s.missing for t in p.tables for s in t.stats.values())
    fewer = "fewer finished or have a value" if missing else "fewer finished"
    if p.pooled or p.expected > 1:
        over = " and ".join(p.pooled) or "repeated cells"
        text = f"{metric}, mean ± sample std over {over} ({p.expected} per cell; `n` shown where {fewer})."
    else:
        text = f"{metric}, one run per cell (nothing averaged)."
    text += f" Rows: `{', '.join(cfg.rows)}`, columns: `{', '.join(cfg.columns)}`."
    asked = [a for a in cfg.pool if a in p.pooled]
    if asked:
        text += f" Averaged over {', '.join(f'`{a}`' for a in asked)} as asked (`report.pool`)."
    if len(p.split_keys) == 1:
        key = p.split_keys[0]
        text += (
            f" One table per value of `{key}`, a sweep axis that rows and columns do not name "
            f"(`--pool {key}` averages over it instead)."
        )
    elif p.split_keys:
        keys = ", ".join(f"`{k}`" for k in p.split_keys)
        text += (
            f" One table per combination of {keys}, sweep axes that rows and columns do not name "
            f"(`--pool {','.join(p.split_keys)}` averages over them instead)."
        )
    if missing:
        text += f" `-`: no record of the cell has {metric}."
    return text


def _baseline(p: Pivot) -> Label | None:
    """The column label that ``config.baseline`` names (its values joined by ``", "``)."""
    if p.config.baseline is None:
        return None
    columns = list(dict.fromkeys(c for t in p.tables for c in t.columns))
    for column in columns:
        if ", ".join(column) == str(p.config.baseline):
            return column
    shown = [", ".join(c) for c in columns]
    raise ReportError(f"report.baseline={p.config.baseline!r} is not a column; the columns are {shown}")


def _paired_table(p: Pivot, table: Table, baseline: Label, heading: str) -> list[str]:
    name = ", ".join(baseline)
    if baseline not in table.columns:
        return ["", f"{heading} Difference to `{name}`: no such column in this table."]
    diffs = paired_differences(p, table, baseline)
    columns = [c for c in table.columns if c != baseline]

    def cell(d: tuple[float, ...]) -> str:
        if not d:
            return "-"
        text = f"{float(np.mean(d)):+.4f}"
        if len(d) > 1:
            text += f" ± {float(np.std(d, ddof=1)):.4f}"
        return text + f" ({sum(x > 0 for x in d)}/{len(d)} > 0)"

    over = " and ".join(p.pooled) or "repeated cells"
    metric = p.config.metric
    lines = [
        "",
        f"{heading} Difference to `{name}`, paired by {over}",
        "",
        f"`{metric}[column] - {metric}[{name}]` for records that agree on {over}: "
        "mean ± sample std of the differences, and how many are above zero.",
        "",
    ]
    body = ([*row, *(cell(diffs[(row, c)]) for c in columns)] for row in table.rows)
    return lines + markdown_table(_header(p.config, columns), body)


def render_markdown(p: Pivot, sweep_dir: pathlib.Path, command: str) -> str:
    """``results.md``: title, caption, the tables, failed cells, how it was produced."""
    cfg = p.config
    lines = [f"# {cfg.title}", "", _caption(p)]
    baseline = _baseline(p)
    for table in p.tables:
        if p.split_keys:
            lines += ["", f"## {describe(p.split_keys, table.split)}"]
        body = (
            [*row, *(format_stat(table.stats[(row, c)], p.expected) for c in table.columns)]
            for row in table.rows
        )
        lines += ["", *markdown_table(_header(cfg, table.columns), body)]
        if baseline is not None:
            lines += _paired_table(p, table, baseline, "###" if p.split_keys else "##")
    if p.failed:
        lines += ["", f"## Failed cells ({len(p.failed)})", ""]
        keys = (*p.split_keys, *cfg.rows, *cfg.columns)
        for f in p.failed:
            error = str(f["error"] or "no error recorded").splitlines()[0]
            where = describe(keys, (*f["split"], *f["row"], *f["column"]), "=")
            lines.append(f"- `{f['cell']}` ({where}): {error}")
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


# -- results.csv, layers.md ------------------------------------------------------------------------


def render_csv(p: Pivot) -> str:
    """``results.csv``: the split, row and column keys (each once), ``mean,std,n``; one line per
    (split, row, column), full precision, empty where there is no value."""
    cfg = p.config
    keys = list(dict.fromkeys((*p.split_keys, *cfg.rows, *cfg.columns)))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, "mean", "std", "n"])
    number = lambda x: repr(x) if not math.isnan(x) else ""
    for t in p.tables:
        for row in t.rows:
            for column in t.columns:
                s = t.stats[(row, column)]
                values = dict(
                    zip((*p.split_keys, *cfg.rows, *cfg.columns), (*t.split, *row, *column), strict=True)
                )
                writer.writerow([*(values[k] for k in keys), number(s.mean), number(s.std), s.n])
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
    """``layers.md``: per-layer ``weight / output`` SQNR (dB), mean over each cell's records, one
    section per row of each table, the first :data:`MAX_LAYER_ROWS` of them."""
    cfg = p.config
    lines = [
        f"# {cfg.title}: per-layer SQNR",
        "",
        "`weight SQNR / output SQNR` in dB (each layer's own output error on the float input), mean over "
        "the finished records of each cell; `-`: not applicable.",
    ]
    sections = [(t, row) for t in p.tables for row in t.rows]
    shown = 0
    for i, (table, row) in enumerate(sections):
        if shown == MAX_LAYER_ROWS:
            lines += ["", f"({len(sections) - i} more rows not shown.)"]
            break
        cells = {", ".join(c): table.stats[(row, c)].records for c in table.columns}
        cells = {c: rs for c, rs in cells.items() if any(r.get("layers") for r in rs)}
        if not cells:
            continue
        paths = dict.fromkeys(
            layer["path"] for rs in cells.values() for r in rs for layer in r.get("layers") or []
        )
        lines += ["", f"## {describe((*p.split_keys, *cfg.rows), (*table.split, *row))}", ""]
        lines += markdown_table(
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
    rows: str | Sequence[str] | None = None,
    columns: str | Sequence[str] | None = None,
    pool: str | Sequence[str] | None = None,
    plot: str | None = None,
    baseline: str | None = None,
    title: str | None = None,
    command: str | None = None,
) -> dict[str, pathlib.Path]:
    """Render ``results.md``, ``results.csv``, ``results.png`` and ``layers.md`` into ``sweep_dir``.

    The keyword arguments override the report config (see the module docstring; ``rows``,
    ``columns`` and ``pool`` take a list of keys or a comma-separated string); ``command`` is the
    command line recorded in ``results.md`` (default: ``qjax-report SWEEP_DIR``). Returns the paths.
    """
    root = pathlib.Path(sweep_dir)
    records = load_results(root)
    cfg = report_config(
        root,
        records,
        metric=metric,
        rows=rows,
        columns=columns,
        pool=pool,
        plot=plot,
        baseline=baseline,
        title=title,
    )
    p = pivot(records, cfg)
    curves = render_curves(records, root, pool=("seed", *cfg.pool), title=cfg.title)
    outputs = {
        "results.md": (render_markdown(p, root, command or f"qjax-report {root}") + curves.markdown).encode(),
        "results.csv": render_csv(p).encode(),
        "results.png": render_plot(p),
        "layers.md": render_layers(p).encode(),
    }
    if curves.png is not None:
        outputs["curves.png"] = curves.png
    paths = {}
    for name, data in outputs.items():
        paths[name] = root / name
        write_atomic(paths[name], data)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``qjax-report SWEEP_DIR [--metric M] [--rows K,..] [--columns K,..] [--pool K,..] [--plot P]
    [--baseline C] [--title T]``."""
    parser = argparse.ArgumentParser(
        prog="qjax-report", description="Re-render a sweep's tables and plots from its results.jsonl."
    )
    parser.add_argument("sweep_dir", help="the sweep directory, e.g. runs/ptq_vs_qat")
    parser.add_argument(
        "--metric", help="metric in the cells: 'accuracy', 'metrics.loss', 'model.size_bytes'"
    )
    parser.add_argument(
        "--rows", help="axis names or dotted config keys of the rows, comma-separated, e.g. bits,method.name"
    )
    parser.add_argument("--columns", help="axis names or dotted config keys of the columns, e.g. method.name")
    parser.add_argument(
        "--pool",
        help="sweep axes to average over besides seed, e.g. quant.rounding_seed (any other axis that "
        "neither rows nor columns name gets a table of its own)",
    )
    parser.add_argument(
        "--plot", choices=PLOTS, help="auto (line for numeric rows, else point), line, point or bar"
    )
    parser.add_argument(
        "--baseline", help="a column label: add a table of per-seed differences to it, e.g. per-channel"
    )
    parser.add_argument("--title", help="the title (default: the sweep's, or '<name>: <metric>')")
    args = parser.parse_args(argv)
    command = " ".join(["qjax-report", *(argv if argv is not None else sys.argv[1:])])
    try:
        paths = render(
            args.sweep_dir,
            metric=args.metric,
            rows=args.rows,
            columns=args.columns,
            pool=args.pool,
            plot=args.plot,
            baseline=args.baseline,
            title=args.title,
            command=command,
        )
    except ReportError as e:
        parser.error(str(e))
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
