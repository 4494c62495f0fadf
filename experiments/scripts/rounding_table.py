"""The design notes' rounding table from the two sweeps of reference study 1.

``python -m experiments.scripts.rounding_table RUNS/study_rounding RUNS/study_rounding_stochastic``

Reads the ``results.jsonl`` of the deterministic sweep (``rounding`` axis: nearest, floor, ceil,
adaround) and of the stochastic one (one cell per draw, ``quant.rounding_seed``), both over
``quant.weights.dtype``, and prints one markdown table: for each bit width, nearest, stochastic
(mean ± sample std over the draws, the worst and the best draw, the share of draws above nearest),
floor, ceil and AdaRound. Only ``ok`` records count; a cell recorded twice counts with its last record.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.sweep.pivot import ReportError, load_results, metric_value

DTYPE = "quant.weights.dtype"


def deterministic(
    records: Sequence[Mapping[str, Any]], metric: str = "accuracy"
) -> dict[tuple[str, str], float]:
    """``(dtype, rounding) -> metric`` of the deterministic sweep."""
    out = {}
    for r in records:
        if r.get("status") == "ok":
            out[(str(r["axes"][DTYPE]), str(r["axes"]["rounding"]))] = metric_value(r, metric)
    return out


def draws(records: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> dict[str, np.ndarray]:
    """``dtype -> metric of every stochastic draw``."""
    out: dict[str, list[float]] = {}
    for r in records:
        if r.get("status") == "ok":
            out.setdefault(str(r["axes"][DTYPE]), []).append(metric_value(r, metric))
    return {k: np.asarray(v) for k, v in out.items()}


def table(fixed: Mapping[tuple[str, str], float], stochastic: Mapping[str, np.ndarray]) -> str:
    """The markdown table (rows: schemes; columns: the bit widths of both sweeps, in the fixed order)."""
    dtypes = list(dict.fromkeys(d for d, _ in fixed))
    missing = [d for d in dtypes if d not in stochastic or (d, "nearest") not in fixed]
    if missing:
        raise ReportError(f"no nearest or stochastic results for {missing}; run both sweeps first")

    def row(name: str, cell: Any) -> str:
        return "| " + " | ".join([name, *(cell(d) for d in dtypes)]) + " |"

    def get(scheme: str) -> Any:
        return lambda d: f"{fixed[(d, scheme)]:.4f}" if (d, scheme) in fixed else "-"

    def share(d: str) -> str:
        a = stochastic[d]
        return f"{int((a > fixed[(d, 'nearest')]).sum())}/{a.size}"

    lines = [
        "| rounding | " + " | ".join(dtypes) + " |",
        "|---|" + "---|" * len(dtypes),
        row("nearest", get("nearest")),
        row(
            "stochastic (mean ± std)",
            lambda d: f"{stochastic[d].mean():.4f} ± {stochastic[d].std(ddof=1):.4f}",
        ),
        row("stochastic, worst draw", lambda d: f"{stochastic[d].min():.4f}"),
        row("stochastic, best draw", lambda d: f"{stochastic[d].max():.4f}"),
        row("draws above nearest", share),
        row("floor", get("floor")),
        row("ceil", get("ceil")),
        row("AdaRound", get("adaround")),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.scripts.rounding_table", description=__doc__)
    parser.add_argument("deterministic", help="sweep directory of rounding_first_conv.yaml")
    parser.add_argument("stochastic", help="sweep directory of rounding_stochastic.yaml")
    parser.add_argument("--metric", default="accuracy")
    args = parser.parse_args(argv)
    try:
        text = table(
            deterministic(load_results(args.deterministic), args.metric),
            draws(load_results(args.stochastic), args.metric),
        )
    except ReportError as e:
        parser.error(str(e))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
