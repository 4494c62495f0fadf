"""What the SmolLM2 study scripts (``llm_kv_cache``, ``llm_rotation``, ``llm_rotation_weights``) share
on their command line: ``--data-dir`` (the checkpoint) and ``--out`` (the rows and the environment as
JSON, or the printed markdown where the file ends in ``.md``), and the printed markdown."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from experiments import records


def llm_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser with ``--data-dir`` and ``--out``; the script adds its own options."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--data-dir", default=None, help="a GGUF file or HF directory (default: SmolLM2-135M)"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        help="write the rows and the environment as JSON, or the markdown if FILE ends in .md",
    )
    return parser


def report_rows(rows: Sequence[dict[str, Any]], markdown: str, out: pathlib.Path | None) -> int:
    """Print ``markdown``; with ``out``, write it there (atomically) if ``out`` ends in ``.md``, else
    ``rows`` and the environment as JSON. Returns 0."""
    sys.stdout.write(markdown)
    if out and out.suffix == ".md":
        records.write_atomic(out, markdown)
    elif out:
        records.write_json(out, {"rows": list(rows), "environment": records.environment()})
    return 0
