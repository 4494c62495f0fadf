"""Outlier statistics of a Llama's linear inputs, per block: the table of ``docs/results/llm.md``.

``python -m experiments.scripts.llm_outliers [--data-dir PATH] [--windows 8] [--threshold 6] [--out FILE]``

On ``--windows`` calibration windows of 512 tokens from the end of the pydoc text (those the
``llm`` task calibrates on), for each block and each linear input (q/k/v: the attention RMSNorm's
output; o: the attention output; gate/up: the MLP RMSNorm's output; down: ``silu(gate) * up``):
the largest :math:`|x|`, the ratio of the largest per-channel maximum to the median one, and the
number of input features with some :math:`|x| \\ge` threshold (LLM.int8()'s outlier features).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

import jax.numpy as jnp

from experiments import records
from experiments.sweep import llm_methods
from experiments.tasks import llm

COLUMNS = ("q_proj/k_proj/v_proj", "o_proj", "gate_proj/up_proj", "down_proj")
LABELS = ("q/k/v", "o", "gate/up", "down")


def outlier_markdown(rows: list[dict], threshold: float) -> str:
    """One line per block: ``max|x|, max/median of channel maxima, features >= threshold`` per input."""
    by_block: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_block.setdefault(r["block"], {})[r["input_of"]] = r
    head = "| block | " + " | ".join(f"{c}: max, max/med, n>={threshold:g}" for c in LABELS) + " |"
    lines = [head, "|---|" + "---|" * len(LABELS)]
    for b in sorted(by_block):
        cells = []
        for c in COLUMNS:
            r = by_block[b][c]
            cells.append(f"{r['max_abs']:.1f}, {r['max_over_median']:.1f}, {r['n_outlier_features']}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.scripts.llm_outliers", description=__doc__)
    parser.add_argument("--data-dir", default=None, help="GGUF file or HF directory (default: SmolLM2-135M)")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--threshold", type=float, default=6.0)
    parser.add_argument("--out", default=None, help="also write the markdown table here (atomically)")
    args = parser.parse_args(argv)
    task = llm.make_task(args.data_dir)
    model = task.make_model(llm.load_checkpoint(args.data_dir).kind, {}, 0)
    calib = [jnp.asarray(task.train.x[-args.windows :])]
    rows = llm_methods.outlier_table(model, calib, args.threshold)
    text = outlier_markdown(rows, args.threshold)
    print(text, end="")
    if args.out:
        records.write_atomic(pathlib.Path(args.out), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
