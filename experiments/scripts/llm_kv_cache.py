"""Perplexity of SmolLM2-135M with a quantized key / value cache: the KV-cache table of
``docs/results/llm.md``.

``python -m experiments.scripts.llm_kv_cache [--data-dir PATH] [--out FILE]``

The weights stay float (the checkpoint as loaded); only the cache is quantized
(:class:`qjax.models.KVCacheQuant`: keys after the rotary embedding and values, symmetric, nearest
rounding, read back dequantized), on the perplexity protocol of the LLM table (16 windows of 512
tokens of the pydoc text). Rows: float, then int8 / fp8 (e4m3) / int4 per token and per head.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from experiments.scripts.llm_cli import llm_parser, report_rows
from experiments.tasks import llm
from qjax.models import (
    KVCacheQuant,
    PerplexityConfig,
    evaluate_perplexity,
    pydoc_text,
    set_kv_cache,
    tokenize,
)

ROWS: tuple[tuple[str, KVCacheQuant | None], ...] = (
    ("float cache", None),
    ("int8 per token", KVCacheQuant("int8", "per_token")),
    ("int8 per head", KVCacheQuant("int8", "per_head")),
    ("fp8 e4m3 per token", KVCacheQuant("float8_e4m3fn", "per_token")),
    ("fp8 e4m3 per head", KVCacheQuant("float8_e4m3fn", "per_head")),
    ("int4 per token", KVCacheQuant("int4", "per_token")),
    ("int4 per head", KVCacheQuant("int4", "per_head")),
)


def kv_rows(data_dir: str | None = None) -> list[dict[str, Any]]:
    checkpoint = llm.load_checkpoint(data_dir)
    tokens = tokenize(checkpoint.tokenizer, pydoc_text())
    model = checkpoint.model()
    rows = []
    for name, kv in ROWS:
        set_kv_cache(model, kv)
        start = time.perf_counter()
        result = evaluate_perplexity(model, tokens, PerplexityConfig(), batch_size=4)
        rows.append(
            {
                "cache": name,
                "dtype": None if kv is None else kv.dtype,
                "granularity": None if kv is None else kv.granularity,
                "perplexity": result.perplexity,
                "n_predictions": result.n_predictions,
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"{name}: {result.perplexity:.3f}", flush=True)
    return rows


def kv_markdown(rows: Sequence[dict[str, Any]]) -> str:
    base = rows[0]["perplexity"]
    lines = ["| KV cache | perplexity | vs float cache |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = llm_parser("python -m experiments.scripts.llm_kv_cache", __doc__).parse_args(argv)
    rows = kv_rows(args.data_dir)
    return report_rows(rows, kv_markdown(rows), args.out)


if __name__ == "__main__":
    sys.exit(main())
