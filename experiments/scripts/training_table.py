"""The tables of the quantized-training study (reference study 9) from its sweeps' records.

``python -m experiments.scripts.training_table RUNS/study_quantized_training [--metric accuracy]``

Reads ``results.jsonl`` (the last ``ok`` record of each cell) and prints, per ``variant`` in the
sweep's order: the metric as mean ± sample std over the seeds, its difference to ``float`` paired
by seed (mean ± std), the mean over seeds of each layer's kernel-gradient SQNR (dB, against a
float backward pass, ``gradient_sqnr_db`` of the records) and the mean wall time of a cell.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.sweep.pivot import ReportError, load_results, metric_value

FLOAT = "float"


def by_variant(records: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[int, Mapping[str, Any]]]:
    """``variant -> {seed: record}`` of the ``ok`` records, in the order the variants first appear."""
    out: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        axes = r["axes"]
        if "variant" not in axes:
            raise ReportError(f"record {r['cell']!r} has no 'variant' axis: not a study 9 sweep")
        metric_value(r, metric)  # names a missing metric clearly
        out.setdefault(str(axes["variant"]), {})[int(r["config"]["seed"])] = r
    return out


def _mean_std(values: Sequence[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(records: Sequence[Mapping[str, Any]], metric: str = "accuracy", digits: int = 4) -> str:
    """The markdown table (see the module docstring)."""
    variants = by_variant(records, metric)
    layers: list[str] = []
    for seeds in variants.values():
        for r in seeds.values():
            layers += [k for k in (r.get("gradient_sqnr_db") or {}) if k not in layers]
    reference = variants.get(FLOAT, {})
    header = [
        "variant",
        f"{metric} (mean ± std)",
        f"vs {FLOAT}, paired by seed",
        *[f"{k} dB" for k in layers],
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, seeds in variants.items():
        values = [metric_value(r, metric) for r in seeds.values()]
        paired = [
            metric_value(r, metric) - metric_value(reference[s], metric)
            for s, r in seeds.items()
            if s in reference
        ]
        diff = "-" if name == FLOAT or not paired else _mean_std(paired, digits)
        sqnr = []
        for layer in layers:
            got = [
                r["gradient_sqnr_db"][layer]
                for r in seeds.values()
                if layer in (r.get("gradient_sqnr_db") or {})
            ]
            sqnr.append(f"{np.mean(got):.1f}" if got else "-")
        lines.append("| " + " | ".join([name, _mean_std(values, digits), diff, *sqnr]) + " |")
    return "\n".join(lines)


def wall_times(records: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> dict[str, float]:
    """``variant -> mean wall time of its cells (s)``."""
    return {
        name: float(np.mean([r["protocol"]["wall_time_s"] for r in seeds.values()]))
        for name, seeds in by_variant(records, metric).items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--digits", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        records = load_results(args.sweep_dir)
        print(table(records, args.metric, args.digits))
        times = wall_times(records, args.metric)
    except ReportError as e:
        print(f"training_table: {e}", file=sys.stderr)
        return 2
    print()
    print("mean cell wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
