"""The pivot of ``qjax-report``: records -> tables of mean ± std, never averaging an axis it was not
told about.

**Keys and labels.** ``rows`` and ``columns`` of :class:`~experiments.sweep.schema.ReportConfig`
each name one or more keys: a sweep axis or a dotted config key. A record's value of a key is
``axes[key]`` if the sweep has that axis, else ``config[a][b]...`` for ``key = "a.b..."``; its row
label is the tuple of its values of the row keys (likewise its column label). The metric is
``metrics.<name>``, ``model.<name>`` (any dotted path into the record) or a bare ``<name>`` of
``metrics``.

**What a cell averages.** A table cell holds the ``ok`` records with its row and column label. The
axes that may vary among them are the seed (the sweep axis ``seed``) and the axes named in
``pool``; nothing else. Every other sweep axis that varies within a cell is a *split key*: the
records go into one table per combination of the split keys' values. Split keys are found in
the order of the axes (first appearance in the records): an axis is one when, with the records
grouped by the split keys found before it and by the row and column keys, some group holds two of
its values. An axis that the row and column keys determine (a named axis whose only setting is a
row key) never splits. Records of one cell whose configs differ in anything but the pooled axes (a
rerun with another override into the same directory) are refused. Each cell then gives

.. math::

    \\bar x = \\frac1n \\sum_i x_i, \\qquad s = \\sqrt{\\frac{1}{n-1} \\sum_i (x_i - \\bar x)^2}

(the sample standard deviation; undefined for :math:`n = 1`), over the ``n`` records of the cell
that have the metric. A record without it (``serve_accuracy`` of a float model) is left out and a
cell with none has no value; a metric that no ``ok`` record has is refused. Failed records are
counted and listed, never averaged.

**Order.** The labels of one key are ordered numerically when all of them are numbers (bits), else
in order of first appearance in the results (the grid's order: ``W8A8, W4A8, W2A8``); tuples of
labels by their first key, then the next. A table keeps the rows and columns that occur in it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import records as records_lib
from experiments.sweep.config import config_differences, normalized_config
from experiments.sweep.schema import ReportConfig

SEED_AXIS = "seed"
MAX_TABLES = 24

Label = tuple[str, ...]


class ReportError(ValueError):
    """The results cannot be reported as asked (missing file, unknown key or metric)."""


# -- reading ---------------------------------------------------------------------------------------


def load_results(sweep_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of ``sweep_dir/results.jsonl``, the last one of each ``cell`` label, in file order."""
    path = pathlib.Path(sweep_dir) / records_lib.RESULTS
    if not path.is_file():
        raise ReportError(f"{path} not found: run the sweep first (qjax-run CONFIG) or pass its directory")
    try:
        results = records_lib.read_results(pathlib.Path(sweep_dir))
    except records_lib.ResultsError as e:
        raise ReportError(str(e)) from None
    by_cell: dict[str, dict[str, Any]] = {}
    for record in results:
        name = str(record["cell"])
        by_cell.pop(name, None)  # a retried cell moves to where its last record is
        by_cell[name] = record
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


def metric_or_none(record: Mapping[str, Any], metric: str) -> float | None:
    """``metric`` of a record (a dotted path into it, ``metrics.accuracy``, ``model.size_bytes``, or
    a bare name in ``metrics``); ``None`` if the record has no such value."""
    key = metric if "." in metric else f"metrics.{metric}"
    try:
        value = _dotted(record, key)
    except KeyError:
        return None
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ReportError(f"metric {metric!r} of cell {record.get('cell')!r} is {value!r}, not a number")
    return float(value)


def metric_value(record: Mapping[str, Any], metric: str) -> float:
    """:func:`metric_or_none`, refusing a record without the metric."""
    value = metric_or_none(record, metric)
    if value is None:
        have = sorted(record.get("metrics") or {})
        raise ReportError(
            f"metric {metric!r} is not in the record of cell {record.get('cell')!r} (metrics: "
            f"{', '.join(have) or 'none'}); use e.g. 'accuracy', 'metrics.loss' or 'model.size_bytes'"
        )
    return value


# -- labels and their order ------------------------------------------------------------------------


def label(value: Any) -> str:
    """A row or column label: strings as they are, numbers as written, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return json.dumps(value, sort_keys=True)


def as_number(value: Any) -> float | None:
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
    numbers = {k: as_number(v) for k, v in first.items()}
    if all(n is not None for n in numbers.values()):
        return sorted(first, key=lambda k: float(numbers[k] or 0.0))
    return list(first)


def ordered_labels(values: Sequence[Sequence[Any]]) -> list[Label]:
    """Distinct label tuples of ``values`` (tuples of one length), ordered by their first key's
    :func:`ordered` rank, then the next key's."""
    if not values:
        return []
    ranks = [
        {name: i for i, name in enumerate(ordered([v[k] for v in values]))} for k in range(len(values[0]))
    ]
    labels = dict.fromkeys(tuple(label(x) for x in v) for v in values)
    return sorted(labels, key=lambda t: tuple(rank[x] for rank, x in zip(ranks, t, strict=True)))


def describe(keys: Sequence[str], values: Sequence[str], sep: str = " = ") -> str:
    """``key = value, ...`` for the keys of a label (a key named twice, once)."""
    pairs = dict(zip(keys, values, strict=True))
    return ", ".join(f"{k}{sep}{v}" for k, v in pairs.items())


# -- the pivot -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stat:
    """One (row, column) cell: its ``ok`` records, their metric values (``None`` where a record has
    no value), the number of failed records; the mean and sample std of the values (NaN for n < 2)."""

    records: tuple[dict[str, Any], ...]
    values: tuple[float | None, ...]
    failed: int

    @property
    def numbers(self) -> tuple[float, ...]:
        return tuple(v for v in self.values if v is not None)

    @property
    def n(self) -> int:
        return len(self.numbers)

    @property
    def missing(self) -> int:
        """``ok`` records without the metric."""
        return len(self.values) - self.n

    @property
    def mean(self) -> float:
        return float(np.mean(self.numbers)) if self.n else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.numbers, ddof=1)) if self.n > 1 else math.nan


@dataclasses.dataclass(frozen=True)
class Table:
    """The records whose split keys take the values ``split``: ``stats[(row, column)]`` for each row
    and column label that occurs among them."""

    split: Label
    rows: list[Label]
    columns: list[Label]
    stats: dict[tuple[Label, Label], Stat]


@dataclasses.dataclass(frozen=True)
class Pivot:
    """The report's tables, one per value combination of ``split_keys`` (one table if none);
    ``pooled``: the axes that vary within a cell (the seeds, ``config.pool``); ``failed``: one
    ``{cell, split, row, column, error}`` per failed record; ``expected``: most records in any cell."""

    config: ReportConfig
    split_keys: tuple[str, ...]
    pooled: tuple[str, ...]
    tables: list[Table]
    failed: list[dict[str, Any]]
    expected: int
    records: list[dict[str, Any]]


def _axes(records: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(a for r in records for a in (r.get("axes") or {})))


def _varies(records: Sequence[Mapping[str, Any]], by: Sequence[str], axis: str) -> bool:
    """Whether some group of ``records`` with equal values of the keys ``by`` holds two values of ``axis``."""
    seen: dict[Label, str] = {}
    for r in records:
        value = label((r.get("axes") or {}).get(axis))
        if seen.setdefault(tuple(label(lookup(r, k)) for k in by), value) != value:
            return True
    return False


def split_and_pooled(
    records: Sequence[Mapping[str, Any]], config: ReportConfig
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(split keys, pooled axes)`` of ``records`` for ``config`` (see the module docstring);
    refuses a ``pool`` key that is not an axis or that rows or columns name, and more than
    :data:`MAX_TABLES` tables."""
    axes = _axes(records)
    named = (*config.rows, *config.columns)
    for key in config.pool:
        if key not in axes:
            raise ReportError(f"pool={key!r} is not an axis of these results; the axes are {axes}")
        if key in named:
            raise ReportError(f"pool={key!r} is a row or column key; pool it or show it, not both")
    split: list[str] = []
    for axis in axes:
        told = axis in named or axis in config.pool or axis == SEED_AXIS
        if not told and _varies(records, [*split, *named], axis):
            split.append(axis)
    by = [*split, *named]
    pooled = tuple(a for a in axes if a not in by and _varies(records, by, a))
    tables = len({tuple(label(lookup(r, k)) for k in split) for r in records})
    if tables > MAX_TABLES:
        shown = ", ".join(split)
        raise ReportError(
            f"the axes {shown} vary within the table cells and are neither rows, columns nor pooled: "
            f"{tables} tables, one per value combination (at most {MAX_TABLES}); show them "
            f"(--rows {','.join((*config.rows, split[0]))} or --columns "
            f"{','.join((*config.columns, split[0]))}) or average over them (--pool {','.join(split)})"
        )
    return tuple(split), pooled


def pivot(records: Sequence[dict[str, Any]], config: ReportConfig) -> Pivot:
    """The tables of ``records`` by ``config.rows`` x ``config.columns`` (see the module docstring)."""
    split, pooled = split_and_pooled(records, config)
    sides = (split, config.rows, config.columns)
    raw = [tuple(tuple(lookup(r, k) for k in keys) for keys in sides) for r in records]
    orders = [ordered_labels([x[i] for x in raw]) for i in range(3)]
    where = [tuple(tuple(label(v) for v in side) for side in x) for x in raw]
    ok: dict[tuple[Label, Label, Label], list[dict[str, Any]]] = {}
    n_failed: dict[tuple[Label, Label, Label], int] = {}
    failed = []
    for record, (s, row, column) in zip(records, where, strict=True):
        if record.get("status") == "ok":
            ok.setdefault((s, row, column), []).append(record)
        else:
            n_failed[(s, row, column)] = n_failed.get((s, row, column), 0) + 1
            failed.append(
                {
                    "cell": record.get("cell"),
                    "split": s,
                    "row": row,
                    "column": column,
                    "error": record.get("error"),
                }
            )
    for key, rs in ok.items():
        _check_pooled(key, rs)
    values = {key: tuple(metric_or_none(r, config.metric) for r in rs) for key, rs in ok.items()}
    if ok and all(v is None for vs in values.values() for v in vs):
        have = sorted({m for rs in ok.values() for r in rs for m in (r.get("metrics") or {})})
        raise ReportError(
            f"no record has the metric {config.metric!r}; the metrics are {', '.join(have) or 'none'} "
            "(or a dotted path into the records such as 'model.size_bytes')"
        )
    tables = []
    for s in orders[0]:
        present = [(row, column) for (s2, row, column) in where if s2 == s]
        rows = [row for row in orders[1] if any(row == r for r, _ in present)]
        columns = [c for c in orders[2] if any(c == c2 for _, c2 in present)]
        stats = {
            (row, c): Stat(
                tuple(ok.get((s, row, c), ())), values.get((s, row, c), ()), n_failed.get((s, row, c), 0)
            )
            for row in rows
            for c in columns
        }
        tables.append(Table(s, rows, columns, stats))
    expected = max(st.n + st.failed for t in tables for st in t.stats.values())
    return Pivot(config, split, pooled, tables, failed, expected, list(records))


def _named_axes(record: Mapping[str, Any]) -> Label:
    """The labels of the record's named axes (those that are not config keys: ``bits: {W8A8: ...}``)."""
    out = []
    for axis, value in (record.get("axes") or {}).items():
        try:
            _dotted(record.get("config") or {}, axis)
        except KeyError:
            out.append(f"{axis}={label(value)}")
    return tuple(out)


def _check_pooled(key: tuple[Label, Label, Label], records: Sequence[Mapping[str, Any]]) -> None:
    """The records averaged in one table cell may differ only in sweep axes (the seeds, the pooled
    axes): records of configs that differ elsewhere (a rerun with another override into the same
    directory) are never pooled. Records of different labels of a named axis (pooled on request)
    differ in the keys that the axis sets, so only records of the same labels are compared."""
    groups: dict[Label, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(_named_axes(record), []).append(record)
    for group in groups.values():
        first = normalized_config(group[0])
        for other in group[1:]:
            axes = [*(group[0].get("axes") or {}), *(other.get("axes") or {})]
            diff = config_differences(first, normalized_config(other), axes)
            if diff:
                shown = ", ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in diff[:4])
                cell = " / ".join(", ".join(part) for part in key if part)
                raise ReportError(
                    f"cell {cell} would average records of different configs "
                    f"({group[0].get('cell')!r} and {other.get('cell')!r} differ in {shown}), which no "
                    "sweep axis names; report them apart (--rows/--columns with that key) or rerun one "
                    "of them into its own output_dir"
                )


def paired_differences(
    p: Pivot, table: Table, baseline: Label
) -> dict[tuple[Label, Label], tuple[float, ...]]:
    """Per row and non-baseline column of ``table``, the differences ``x[column] - x[baseline]`` of
    records that agree on every pooled axis (the seeds): one per matched pair, in the order of the
    cell's records."""

    def key(record: Mapping[str, Any]) -> Label:
        return tuple(label((record.get("axes") or {}).get(a)) for a in p.pooled)

    out = {}
    for row in table.rows:
        ref = table.stats[(row, baseline)]
        base = {key(r): v for r, v in zip(ref.records, ref.values, strict=True) if v is not None}
        for column in table.columns:
            if column == baseline:
                continue
            stat = table.stats[(row, column)]
            out[(row, column)] = tuple(
                v - base[key(r)]
                for r, v in zip(stat.records, stat.values, strict=True)
                if v is not None and key(r) in base
            )
    return out
