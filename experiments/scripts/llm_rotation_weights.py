"""What a Hadamard rotation does to a Llama's weights under 4-bit round-to-nearest: the weight error
per layer type, the checkpoint's Q4_1 grid, and the RMSNorm channels with near-zero gains.

``python -m experiments.scripts.llm_rotation_weights [--data-dir PATH] [--seed N] [--out FILE]``

Three weight sets of every linear (kernels (in, out), rows the input channels), in float64:
(a) the checkpoint's; (b) the RMSNorm gains fused into the linears that read the norm,
:math:`\\operatorname{diag}(g) W` for q, k, v (``attn_norm``) and gate, up (``mlp_norm``), o and
down unchanged (:func:`qjax.methods.fuse_norms`); (c) (b) with the residual stream rotated by
:math:`Q` = :func:`qjax.numerics.random_hadamard` ``(dim, seed)`` and ``down_proj``'s input by
:math:`\\bar H = H_n / \\sqrt{n}` (:func:`qjax.methods.rotate_weights`, ``online_down=True``;
:func:`qjax.methods.rotate_llama`'s defaults): readers :math:`Q^\\top W`, ``o_proj``
:math:`W Q`, ``down_proj`` :math:`\\bar H^\\top W Q`.

Tables (means over the blocks per layer type):

1. **Per-channel RTN.** :math:`\\|W - Q(W)\\|_F / \\|W\\|_F` for qjax's int4 symmetric per output
   channel quantizer (``QuantSpec(dtype="int4", granularity="per_channel", axis=-1)``: one scale
   :math:`\\max_i |W_{ij}| / 7` per column), with the columns' kurtosis
   :math:`E[(w - \\bar w)^4] / E[(w - \\bar w)^2]^2` (3 for a Gaussian) and peak ratio
   :math:`\\max |w| / \\mathrm{rms}(w)`; and the whole model's
   :math:`\\sqrt{\\sum \\|W - Q(W)\\|_F^2 / \\sum \\|W\\|_F^2}` over all its linears.
2. **The Q4_1 grid.** The distinct values of each block of 32 input channels (of 32 output
   channels: the control), and two 4-bit quantizers of those blocks: the Q4_1 grid
   :math:`m + d\\,q`, :math:`q \\in \\{0..15\\}`, with :math:`m` the block's minimum and
   :math:`d = (\\max - m) / 15` (qjax's asymmetric int4 ``per_group`` ``group_size=32`` ``axis=0``
   quantizer on :math:`W - m`, whose zero point then sits at the lowest code), and the same qjax
   quantizer on :math:`W` itself (an integer zero point: 0.0 on the grid).
3. **Near-zero gains.** Per block the smallest :math:`|g|` of each RMSNorm, its channel and the
   median :math:`|g|`; then the readers' relative output error on synthetic normalized tokens
   :math:`\\hat x` (:math:`\\|\\hat x\\|^2 = d`) holding a fraction :math:`f` of their energy in the
   channel :math:`j` of the norm's smallest gain, the rest a random Gaussian direction:
   :math:`\\|\\hat x E\\| / \\|\\hat x \\operatorname{diag}(g) W\\|` with
   :math:`E_a = \\operatorname{diag}(g)(W - Q(W))` (the unrotated model quantizes :math:`W` and
   keeps the gain) and :math:`E_c = Q (R - Q(R))` (the rotated model reads :math:`\\hat x Q`),
   averaged over the tokens.

Every qjax quantizer computes in float32; the errors and statistics here are float64. Before the
tables, the check that (c) computes what (a) computes: the largest relative deviation of the
rotated linears' outputs from the originals' on random inputs.
"""

from __future__ import annotations

import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import records
from experiments.scripts.llm_cli import llm_parser, report_rows
from experiments.tasks import llm
from qjax.methods import fuse_norms, rotate_weights
from qjax.models import LlamaConfig
from qjax.numerics import QuantSpec, hadamard, quantize_dequantize, random_hadamard

Weights = dict[str, np.ndarray]
READERS = {
    "attn_norm": ("attn/q_proj", "attn/k_proj", "attn/v_proj"),
    "mlp_norm": ("mlp/gate_proj", "mlp/up_proj"),
}
WRITERS = ("attn/o_proj", "mlp/down_proj")
LINEARS = (*READERS["attn_norm"], "attn/o_proj", *READERS["mlp_norm"], "mlp/down_proj")
VARIANTS = ("original", "fused", "rotated")
FRACTIONS = (0.0, 0.5, 0.9, 0.99)
GROUP = 32
PER_CHANNEL = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
GROUP_ASYMMETRIC = QuantSpec(dtype="int4", granularity="per_group", group_size=GROUP, axis=0, symmetric=False)

_quantize_dequantize = jax.jit(quantize_dequantize, static_argnames="spec")


def kernel(block: int, linear: str) -> str:
    return f"layers/{block}/{linear}/kernel"


def gain(weights: Weights, block: int, norm: str) -> np.ndarray:
    return np.asarray(weights[f"layers/{block}/{norm}/weight"], np.float64)


def rtn(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """:math:`Q(W)`: qjax's quantize-dequantize of ``w`` with ``spec`` (in float32), as float64."""
    return np.asarray(_quantize_dequantize(jnp.asarray(w, jnp.float32), spec), np.float64)


def q4_1_rtn(w: np.ndarray, group: int = GROUP) -> np.ndarray:
    """The Q4_1 grid on blocks of ``group`` rows: :math:`m + d q`, :math:`q \\in \\{0..15\\}`,
    :math:`m` the block minimum, :math:`d = (\\max - m) / 15`: qjax's asymmetric int4 per-group
    quantizer on :math:`W - m \\ge 0` (range :math:`[0, \\max - m]`, zero point at the lowest code),
    plus :math:`m`. ``w`` (in, out) with ``group`` dividing ``in``."""
    n, m = w.shape
    low = np.repeat(w.reshape(n // group, group, m).min(axis=1), group, axis=0)
    return rtn(w - low, GROUP_ASYMMETRIC) + low


def relative_error(w: np.ndarray, q: np.ndarray) -> float:
    return float(np.linalg.norm(w - q) / np.linalg.norm(w))


def column_kurtosis(w: np.ndarray) -> np.ndarray:
    """:math:`E[(w - \\bar w)^4] / E[(w - \\bar w)^2]^2` of each column (over the input axis)."""
    z = w - w.mean(axis=0)
    return (z**4).mean(axis=0) / (z**2).mean(axis=0) ** 2


def column_peak_ratio(w: np.ndarray) -> np.ndarray:
    """:math:`\\max |w| / \\mathrm{rms}(w)` of each column."""
    return np.abs(w).max(axis=0) / np.sqrt((w**2).mean(axis=0))


def distinct_per_block(w: np.ndarray, axis: int, group: int = GROUP) -> np.ndarray:
    """The number of distinct values in each block of ``group`` consecutive entries along ``axis``."""
    w = np.moveaxis(w, axis, 0)
    blocks = np.sort(w.reshape(w.shape[0] // group, group, -1), axis=1)
    return 1 + np.count_nonzero(np.diff(blocks, axis=1), axis=1)


class WeightVariants(NamedTuple):
    """The weight sets compared (paths as :func:`qjax.models.model_weights`): ``original`` as given,
    ``fused`` and ``rotated`` float64 (module docstring); ``q`` (dim, dim) the residual rotation,
    ``h_down`` (hidden, hidden) the normalized Hadamard matrix before ``down_proj``."""

    original: Weights
    fused: Weights
    rotated: Weights
    q: np.ndarray
    h_down: np.ndarray


def weight_variants(config: LlamaConfig, weights: Weights, *, seed: int = 0) -> WeightVariants:
    """(a), (b) and (c) of the module docstring, rotated by ``random_hadamard(dim, seed)``."""
    fused_config, fused = fuse_norms(config, weights)
    q = random_hadamard(config.dim, seed)
    _, rotated = rotate_weights(fused_config, fused, q, online_down=True, rotate_qk=False)
    h_down = hadamard(config.hidden_dim) / math.sqrt(config.hidden_dim)
    return WeightVariants(weights, fused, rotated, q, h_down)


def rotation_deviation(
    config: LlamaConfig, v: WeightVariants, *, seed: int = 0, n_inputs: int = 8
) -> dict[str, float]:
    """Per linear, the largest over blocks of :math:`\\max|y_c - y_a| / \\max|y_a|` on Gaussian
    inputs: readers :math:`y_a = (x \\odot g) W`, :math:`y_c = (x Q) R`; ``o_proj``
    :math:`y_a = x W`, :math:`y_c = x R Q^\\top`; ``down_proj`` :math:`y_a = z W`,
    :math:`y_c = (z \\bar H) R Q^\\top` (the residual stream mapped back by :math:`Q^\\top`)."""
    rng = np.random.default_rng(seed)
    worst = dict.fromkeys(LINEARS, 0.0)
    for i in range(config.n_layers):
        pairs = []
        for norm, readers in READERS.items():
            x = rng.standard_normal((n_inputs, config.dim))
            for linear in readers:
                w = np.asarray(v.original[kernel(i, linear)], np.float64)
                pairs.append(
                    (linear, (x * gain(v.original, i, norm)) @ w, (x @ v.q) @ v.rotated[kernel(i, linear)])
                )
        for linear, width, mix in (
            ("attn/o_proj", config.dim, None),
            ("mlp/down_proj", config.hidden_dim, v.h_down),
        ):
            z = rng.standard_normal((n_inputs, width))
            w = np.asarray(v.original[kernel(i, linear)], np.float64)
            zin = z if mix is None else z @ mix
            pairs.append((linear, z @ w, zin @ v.rotated[kernel(i, linear)] @ v.q.T))
        for linear, want, got in pairs:
            worst[linear] = max(worst[linear], float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


def linear_row(v: WeightVariants, block: int, linear: str) -> dict[str, Any]:
    """Tables 1 and 2 for one linear: per variant the per-channel RTN error (and its squared error
    and squared norm, for the whole model), kurtosis, peak ratio, Q4_1-grid and asymmetric g32
    errors; the distinct values per 32-block of the original along each axis."""
    path = kernel(block, linear)
    row: dict[str, Any] = {"block": block, "linear": linear}
    for name, weights in zip(VARIANTS, (v.original, v.fused, v.rotated), strict=True):
        w = np.asarray(weights[path], np.float64)
        q = rtn(w, PER_CHANNEL)
        row[f"error_{name}"] = relative_error(w, q)
        row[f"squared_error_{name}"] = float(np.sum((w - q) ** 2))
        row[f"squared_norm_{name}"] = float(np.sum(w**2))
        row[f"kurtosis_{name}"] = float(column_kurtosis(w).mean())
        row[f"peak_{name}"] = float(column_peak_ratio(w).mean())
        row[f"q4_1_{name}"] = relative_error(w, q4_1_rtn(w))
        row[f"asym_{name}"] = relative_error(w, rtn(w, GROUP_ASYMMETRIC))
    w = np.asarray(v.original[path])
    distinct = distinct_per_block(w, axis=0)
    row["distinct_mean"] = float(distinct.mean())
    row["distinct_max"] = int(distinct.max())
    row["distinct_out_mean"] = float(distinct_per_block(w, axis=1).mean())
    return row


def check_widths(config: LlamaConfig) -> None:
    """Tables 1 and 2 cut every kernel axis into blocks of :data:`GROUP` channels."""
    widths = {"dim": config.dim, "hidden_dim": config.hidden_dim}
    widths["n_kv_heads * head_dim"] = config.n_kv_heads * config.head_dim
    for name, width in widths.items():
        if width % GROUP:
            raise ValueError(
                f"{name}={width} is not a multiple of {GROUP}: the Q4_1-grid table cuts every kernel "
                f"axis into blocks of {GROUP} channels; use a model whose widths are multiples of {GROUP}"
            )


def weight_rows(config: LlamaConfig, v: WeightVariants) -> list[dict[str, Any]]:
    """:func:`linear_row` for every linear of every block."""
    check_widths(config)
    return [linear_row(v, i, linear) for i in range(config.n_layers) for linear in LINEARS]


def model_error(rows: Sequence[dict[str, Any]], variant: str) -> float:
    """:math:`\\sqrt{\\sum \\|W - Q(W)\\|_F^2 / \\sum \\|W\\|_F^2}` over ``rows``."""
    num = sum(r[f"squared_error_{variant}"] for r in rows)
    return math.sqrt(num / sum(r[f"squared_norm_{variant}"] for r in rows))


def gain_rows(config: LlamaConfig, weights: Weights) -> list[dict[str, Any]]:
    """Per block and RMSNorm: the smallest :math:`|g|`, its channel and the median :math:`|g|`."""
    rows = []
    for i in range(config.n_layers):
        for norm in READERS:
            g = np.abs(gain(weights, i, norm))
            j = int(g.argmin())
            rows.append(
                {
                    "block": i,
                    "norm": norm,
                    "min_gain": float(g[j]),
                    "channel": j,
                    "median_gain": float(np.median(g)),
                }
            )
    return rows


def synthetic_tokens(rng: np.random.Generator, dim: int, channel: int, fraction: float, n: int) -> np.ndarray:
    """``n`` tokens (n, dim) with :math:`\\|\\hat x\\|^2 = d`, :math:`\\hat x_j^2 = f d` and the rest a
    uniformly random direction."""
    x = rng.standard_normal((n, dim))
    x[:, channel] = 0.0
    x *= np.sqrt((1.0 - fraction) * dim) / np.linalg.norm(x, axis=1, keepdims=True)
    x[:, channel] = np.sqrt(fraction * dim)
    return x


def token_rows(
    config: LlamaConfig,
    v: WeightVariants,
    fractions: Sequence[float] = FRACTIONS,
    *,
    n_tokens: int = 64,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Table 3's synthetic-token errors: per block, reader and fraction, the mean over ``n_tokens``
    tokens of :math:`\\|\\hat x E\\| / \\|\\hat x S\\|`, unrotated (:math:`E_a`) and rotated
    (:math:`E_c`), :math:`S = \\operatorname{diag}(g) W` (module docstring)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(config.n_layers):
        for norm, readers in READERS.items():
            g = gain(v.original, i, norm)
            channel = int(np.abs(g).argmin())
            errors = {}
            for linear in readers:
                w = np.asarray(v.original[kernel(i, linear)], np.float64)
                r = v.rotated[kernel(i, linear)]
                unrotated = g[:, None] * (w - rtn(w, PER_CHANNEL))
                errors[linear] = (v.fused[kernel(i, linear)], unrotated, v.q @ (r - rtn(r, PER_CHANNEL)))
            for f in fractions:
                x = synthetic_tokens(rng, config.dim, channel, f, n_tokens)
                for linear, (signal, unrotated, rotated) in errors.items():
                    size = np.linalg.norm(x @ signal, axis=1)
                    rows.append(
                        {
                            "block": i,
                            "linear": linear,
                            "fraction": f,
                            "channel": channel,
                            "n_tokens": n_tokens,
                            "unrotated": float(np.mean(np.linalg.norm(x @ unrotated, axis=1) / size)),
                            "rotated": float(np.mean(np.linalg.norm(x @ rotated, axis=1) / size)),
                        }
                    )
    return rows


def means(
    rows: Sequence[dict[str, Any]], by: str, keys: Sequence[str], order: Sequence[Any]
) -> list[dict[str, Any]]:
    """One row per value of ``by`` (in ``order``): the mean of each of ``keys`` over ``rows``."""
    out = []
    for value in order:
        group = [r for r in rows if r[by] == value]
        out.append({by: value, **{k: float(np.mean([r[k] for r in group])) for k in keys}})
    return out


def short(linear: str) -> str:
    return linear.split("/")[1]


def _by_variant(header: str, key: str, spec: str) -> list[tuple[str, str, str]]:
    return [(f"{header} ({tag})", f"{key}_{name}", spec) for tag, name in zip("abc", VARIANTS, strict=True)]


def weight_tables(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, str]:
    """Tables 1 and 2 (markdown) and their rows: the means per layer type, then over all linears."""
    keys = [k for k in rows[0] if k not in ("block", "linear")]
    summary = means(rows, "linear", keys, LINEARS) + means(
        [{**r, "linear": "all"} for r in rows], "linear", keys, ["all"]
    )
    for s in summary:
        s["layer"] = short(s["linear"]) if s["linear"] != "all" else "all linears"
        s["distinct_max"] = max(r["distinct_max"] for r in rows if s["linear"] in ("all", r["linear"]))
    rtn_columns = [("layer", "layer", "s")]
    rtn_columns += _by_variant("error", "error", ".4f") + _by_variant("kurtosis", "kurtosis", ".2f")
    rtn_columns += _by_variant("max/rms", "peak", ".2f")
    grid_columns = [("layer", "layer", "s"), ("distinct / 32 in", "distinct_mean", ".2f")]
    grid_columns += [("max", "distinct_max", "d"), ("distinct / 32 out", "distinct_out_mean", ".2f")]
    grid_columns += _by_variant("Q4_1 grid", "q4_1", ".3g") + _by_variant("asym g32", "asym", ".3g")
    return (
        summary,
        records.markdown_table(summary, rtn_columns),
        records.markdown_table(summary, grid_columns),
    )


def gain_table(rows: Sequence[dict[str, Any]]) -> str:
    by_block: dict[int, dict[str, Any]] = {}
    for r in rows:
        cells = {f"{r['norm']}_{k}": r[k] for k in ("min_gain", "channel", "median_gain")}
        by_block.setdefault(r["block"], {"block": r["block"]}).update(cells)
    columns = [("block", "block", "d")]
    for norm in READERS:
        columns += [(f"{norm} min abs g", f"{norm}_min_gain", ".1e"), ("channel", f"{norm}_channel", "d")]
        columns.append(("median abs g", f"{norm}_median_gain", ".3f"))
    return records.markdown_table(list(by_block.values()), columns)


def token_table(
    rows: Sequence[dict[str, Any]], fractions: Sequence[float]
) -> tuple[list[dict[str, Any]], str]:
    """One row per fraction: per reader the mean over blocks of the unrotated and rotated errors."""
    summary = []
    for f in fractions:
        row: dict[str, Any] = {"fraction": f}
        for linear in (*READERS["attn_norm"], *READERS["mlp_norm"]):
            group = [r for r in rows if r["fraction"] == f and r["linear"] == linear]
            for variant in ("unrotated", "rotated"):
                row[f"{short(linear)}_{variant}"] = float(np.mean([r[variant] for r in group]))
        summary.append(row)
    columns = [("f", "fraction", "g")]
    for linear in (*READERS["attn_norm"], *READERS["mlp_norm"]):
        name = short(linear)
        columns += [(f"{name} (a)", f"{name}_unrotated", ".3f"), (f"{name} (c)", f"{name}_rotated", ".3f")]
    return summary, records.markdown_table(summary, columns)


class Report(NamedTuple):
    """What the tables show: the rotation check (per linear), the per-linear rows of tables 1 and 2,
    the whole model's per-channel RTN error (per variant), the gains and the synthetic-token rows."""

    deviation: dict[str, float]
    linears: list[dict[str, Any]]
    model_errors: dict[str, float]
    gains: list[dict[str, Any]]
    tokens: list[dict[str, Any]]


def weights_report(
    config: LlamaConfig,
    weights: Weights,
    *,
    seed: int = 0,
    fractions: Sequence[float] = FRACTIONS,
    n_tokens: int = 64,
) -> Report:
    """The measurements of the module docstring on ``weights`` (paths as
    :func:`qjax.models.model_weights`), rotated by ``random_hadamard(dim, seed)``."""
    v = weight_variants(config, weights, seed=seed)
    linears = weight_rows(config, v)
    return Report(
        deviation=rotation_deviation(config, v, seed=seed),
        linears=linears,
        model_errors={name: model_error(linears, name) for name in VARIANTS},
        gains=gain_rows(config, weights),
        tokens=token_rows(config, v, fractions, n_tokens=n_tokens, seed=seed),
    )


def report_markdown(report: Report, *, source: str = "") -> tuple[list[dict[str, Any]], str]:
    """The tables as markdown, headed by ``source`` (a sentence naming the weights), and their rows."""
    summary, rtn_table, grid_table = weight_tables(report.linears)
    fractions = list(dict.fromkeys(r["fraction"] for r in report.tokens))
    tokens, synthetic_table = token_table(report.tokens, fractions)
    n = len({r["block"] for r in report.linears})
    n_tokens = report.tokens[0]["n_tokens"]
    variants = zip("abc", VARIANTS, strict=True)
    text = "\n\n".join(
        [
            "# 4-bit RTN of a Llama's weights before and after a Hadamard rotation",
            f"{source}(a) the original weights, (b) the RMSNorm gains fused into q, k, v, gate, up, (c) (b) "
            "with the residual stream and down_proj's input rotated; definitions in the module docstring "
            "of `experiments/scripts/llm_rotation_weights.py`.",
            "Rotation check, largest relative deviation of (c)'s layer outputs from (a)'s: "
            + ", ".join(f"{short(k)} {d:.1e}" for k, d in report.deviation.items()),
            f"## 1. int4 symmetric per-output-channel RTN\n\nMeans over the {n} blocks: relative weight "
            "error, column kurtosis, column max/rms.",
            rtn_table,
            "Whole model, all linears: "
            + ", ".join(f"({t}) {report.model_errors[name]:.4f}" for t, name in variants),
            f"## 2. The Q4_1 grid\n\nMeans over the {n} blocks: distinct values per block of 32 input "
            "channels (mean, max) and of 32 output channels; relative error of the Q4_1 grid (block "
            "minimum + 15 steps) and of qjax's asymmetric int4 g32 (integer zero point), blocks of 32 "
            "input channels.",
            grid_table,
            "## 3. Near-zero RMSNorm gains\n\nSmallest gain per norm and block, its channel, the median.",
            gain_table(report.gains),
            f"Relative output error of the readers on {n_tokens} synthetic tokens with a fraction f of "
            f"their energy in the norm's smallest-gain channel, mean over the {n} blocks: (a) unrotated, "
            "(c) rotated.",
            synthetic_table,
        ]
    )
    rows = [{"table": "rotation_check", **report.deviation}]
    rows += [{"table": "weights", **s} for s in summary] + [{"table": "model_error", **report.model_errors}]
    rows += [{"table": "gains", **g} for g in report.gains]
    rows += [{"table": "synthetic_tokens", **t} for t in tokens]
    return rows, text + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = llm_parser("python -m experiments.scripts.llm_rotation_weights", __doc__)
    parser.add_argument("--seed", type=int, default=0, help="the seed of the rotation's random signs")
    args = parser.parse_args(argv)
    checkpoint = llm.load_checkpoint(args.data_dir)
    c = checkpoint.config
    source = (
        f"`{pathlib.Path(checkpoint.path).name}` ({c.n_layers} blocks, d={c.dim}, hidden {c.hidden_dim}), "
        f"rotation seed {args.seed}: "
    )
    rows, text = report_markdown(weights_report(c, checkpoint.weights, seed=args.seed), source=source)
    return report_rows(rows, text, args.out)


if __name__ == "__main__":
    sys.exit(main())
