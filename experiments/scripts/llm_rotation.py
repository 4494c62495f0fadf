"""The float perplexity of SmolLM2-135M before and after a Hadamard rotation: the rotated model must
compute what the float model computes (:func:`qjax.methods.rotate_llama`; docs/results/llm.md).

``python -m experiments.scripts.llm_rotation [--data-dir PATH] [--seed N] [--rotate-qk] [--out FILE]``

Rows, on the perplexity protocol of the LLM table (16 windows of 512 tokens of the pydoc text):
the float model, then the same model rotated (norm gains fused, residual stream rotated by a
randomized Hadamard matrix, ``down_proj``'s input rotated online; with ``--rotate-qk`` also queries
and keys per head), all in float32. Each row records its perplexity, the seconds the rotation took
and the seconds the evaluation took.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments.scripts.llm_cli import llm_parser, report_rows
from experiments.tasks import llm
from qjax.methods import rotate_llama
from qjax.models import PerplexityConfig, evaluate_perplexity, llama_from_weights, pydoc_text, tokenize


def rotation_rows(
    data_dir: str | None = None, *, seed: int = 0, rotate_qk: bool = False
) -> list[dict[str, Any]]:
    checkpoint = llm.load_checkpoint(data_dir)
    tokens = tokenize(checkpoint.tokenizer, pydoc_text())
    model = llama_from_weights(checkpoint.config, checkpoint.weights)
    variants: list[tuple[str, dict[str, bool] | None]] = [("float", None), ("rotated", {"rotate_qk": False})]
    if rotate_qk:
        variants.append(("rotated + q/k", {"rotate_qk": True}))
    rows = []
    for name, options in variants:
        start = time.perf_counter()
        evaluated = model if options is None else rotate_llama(model, seed=seed, **options)
        rotation_s = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate_perplexity(evaluated, tokens, PerplexityConfig(), batch_size=4)
        rows.append(
            {
                "model": name,
                "seed": None if options is None else seed,
                "perplexity": result.perplexity,
                "n_predictions": result.n_predictions,
                "rotation_seconds": rotation_s,
                "eval_seconds": time.perf_counter() - start,
            }
        )
        print(f"{name}: {result.perplexity:.4f} (rotation {rotation_s:.1f} s)", flush=True)
    return rows


def rotation_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | perplexity | rotation (s) | evaluation (s) |", "|---|---:|---:|---:|"]
    for r in rows:
        seconds = f"{r['rotation_seconds']:.1f} | {r['eval_seconds']:.0f}"
        lines.append(f"| {r['model']} | {r['perplexity']:.4f} | {seconds} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = llm_parser("python -m experiments.scripts.llm_rotation", __doc__)
    parser.add_argument("--seed", type=int, default=0, help="the seed of the rotation's random signs")
    parser.add_argument("--rotate-qk", action="store_true", help="add a row with queries and keys rotated")
    args = parser.parse_args(argv)
    rows = rotation_rows(args.data_dir, seed=args.seed, rotate_qk=args.rotate_qk)
    return report_rows(rows, rotation_markdown(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
