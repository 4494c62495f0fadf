"""The tables of the quantized-training study (reference study 8) from its sweeps' records.

``python -m experiments.scripts.training_table RUNS/study_quantized_training [--metric accuracy]
[--plot curves.png]``

Reads ``results.jsonl`` (the last ``ok`` record of each cell) and prints, per ``variant`` in the
sweep's order: the metric as mean ± sample std over the seeds, its difference to ``float`` paired
by seed (mean ± std), the mean over seeds of each layer's kernel-gradient SQNR (dB, against a
float backward pass, ``gradient_sqnr_db`` of the records) and the mean wall time of a cell.
``--plot``: the training loss of every variant against the step (mean over seeds; a moving average
over ``--smooth`` logged steps) and its difference to ``float``'s loss at the same step of the same
seed (the same batches: the noise of the batches cancels).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.sweep import tracking
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
            raise ReportError(f"record {r['cell']!r} has no 'variant' axis: not a study 8 sweep")
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
            recorded = [(r.get("gradient_sqnr_db") or {}).get(layer) for r in seeds.values()]
            got = [v for v in recorded if v is not None]  # None: not finite (an exact gradient)
            sqnr.append(f"{np.mean(got):.1f}" if got else "-")
        lines.append("| " + " | ".join([name, _mean_std(values, digits), diff, *sqnr]) + " |")
    return "\n".join(lines)


def wall_times(records: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> dict[str, float]:
    """``variant -> mean wall time of its cells (s)``."""
    return {
        name: float(np.mean([r["protocol"]["wall_time_s"] for r in seeds.values()]))
        for name, seeds in by_variant(records, metric).items()
    }


def loss_curves(
    sweep_dir: pathlib.Path, records: Sequence[Mapping[str, Any]], metric: str = "accuracy"
) -> dict[str, dict[int, dict[int, float]]]:
    """``variant -> {seed: {step: training loss}}`` from each cell's ``metrics.jsonl``."""
    out: dict[str, dict[int, dict[int, float]]] = {}
    for name, seeds in by_variant(records, metric).items():
        for seed, r in seeds.items():
            rows = tracking.read_metrics(sweep_dir / r["run_dir"] / "metrics.jsonl")
            out.setdefault(name, {})[seed] = {
                int(row["step"]): float(row["loss"]) for row in rows if "loss" in row
            }
    return out


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    return np.convolve(y, np.ones(window) / window, mode="valid")


def plot_curves(
    curves: Mapping[str, Mapping[int, Mapping[int, float]]], path: pathlib.Path, smooth: int = 5
) -> None:
    """The figure of ``--plot`` (module docstring), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dax) = plt.subplots(1, 2, figsize=(12, 4.5))
    reference = curves.get(FLOAT, {})
    for i, (name, seeds) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        steps = sorted(set.intersection(*(set(c) for c in seeds.values())))
        if not steps:
            continue
        mean = np.mean([[seeds[s][t] for t in steps] for s in seeds], axis=0)
        x = np.asarray(steps)[smooth - 1 :] if len(steps) >= smooth > 1 else np.asarray(steps)
        ax.plot(x, _smooth(mean, smooth), label=name, color=colour)
        paired = [s for s in seeds if s in reference]
        common = [t for t in steps if all(t in reference[s] for s in paired)]
        if name != FLOAT and paired and common:
            diff = np.mean([[seeds[s][t] - reference[s][t] for t in common] for s in paired], axis=0)
            dx = np.asarray(common)[smooth - 1 :] if len(common) >= smooth > 1 else np.asarray(common)
            dax.plot(dx, _smooth(diff, smooth), label=name, color=colour)
    ax.set(
        xlabel="step",
        ylabel="training loss",
        title=f"training loss (mean over seeds, {smooth}-point average)",
    )
    dax.axhline(0.0, color="black", lw=0.8)
    dax.set(
        xlabel="step", ylabel=f"loss - {FLOAT} loss", title="difference to float (same seed, same batches)"
    )
    for a in (ax, dax):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--plot", type=pathlib.Path, help="write the loss curves here (png)")
    parser.add_argument("--smooth", type=int, default=5, help="moving average over this many logged steps")
    args = parser.parse_args(argv)
    try:
        records = load_results(args.sweep_dir)
        print(table(records, args.metric, args.digits))
        times = wall_times(records, args.metric)
        if args.plot:
            plot_curves(
                loss_curves(pathlib.Path(args.sweep_dir), records, args.metric), args.plot, args.smooth
            )
    except ReportError as e:
        print(f"training_table: {e}", file=sys.stderr)
        return 2
    print()
    print("mean cell wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
