"""The LLM results table of ``docs/results/llm.md`` from a sweep of ``configs/llm/table.yaml``.

``python -m experiments.scripts.llm_table runs/llm_table``

One row per cell (``variant`` axis), in the order of the sweep's ``sweep.yaml``: perplexity, its
change against the ``float`` cell, the cell's wall time (model loading, the method, calibration,
evaluation and diagnostics), the model's stored size (``model.size_bytes``: packed integer kernels with their
scales, float parameters at 4 bytes) and, for cells run with ``eval.export``, the size on disk of
the orbax export and the perplexity of the model reloaded from it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from experiments.sweep.pivot import ReportError, load_results


def llm_table(records: Sequence[Mapping[str, Any]], order: Sequence[str] = ()) -> str:
    """The markdown table (see the module docstring); rows in ``order`` first, then the rest."""
    found = {str(r["axes"]["variant"]): r for r in records}
    by_variant = {name: found[name] for name in order if name in found}
    by_variant.update({name: r for name, r in found.items() if name not in by_variant})
    if "float" not in by_variant or by_variant["float"].get("status") != "ok":
        raise ReportError("no finished 'float' cell: run the sweep's float variant first")
    base = by_variant["float"]["metrics"]["perplexity"]
    lines = [
        "| variant | perplexity | vs float | cell time (s) | stored size (MB) "
        "| export on disk (MB) / reloaded ppl |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in by_variant.items():
        if r.get("status") != "ok":
            error = str(r.get("error") or "").splitlines()[0][:100]
            lines.append(f"| {name} | failed: {error} | | | | |")
            continue
        m, ppl = r["metrics"], r["metrics"]["perplexity"]
        export = (
            f"{m['export_bytes'] / 1e6:.1f} / {m['export_perplexity']:.3f}" if "export_bytes" in m else ""
        )
        lines.append(
            f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% | {r['protocol']['wall_time_s']:.0f} | "
            f"{r['model']['size_bytes'] / 1e6:.1f} | {export} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.scripts.llm_table", description=__doc__)
    parser.add_argument(
        "sweep_dir", help="the sweep directory of configs/llm/table.yaml, e.g. runs/llm_table"
    )
    args = parser.parse_args(argv)
    sweep_yaml = pathlib.Path(args.sweep_dir) / "sweep.yaml"
    raw = yaml.safe_load(sweep_yaml.read_text()) if sweep_yaml.is_file() else {}
    order = [str(k) for k in ((raw.get("sweep") or {}).get("variant") or {})]
    try:
        print(llm_table(load_results(args.sweep_dir), order), end="")
    except ReportError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
