"""The LLM results tables of ``docs/results/llm.md`` from sweeps of ``configs/llm/*.yaml``.

``python -m experiments.scripts.llm_table runs/llm_table [runs/llm_grids ...] [--plot bits.png]``

One table per sweep directory, one row per cell (``variant`` axis) in the order of the sweep's
``sweep.yaml``: perplexity, its change against the ``float`` cell (of the first sweep that has
one), the stored bits per weight of the blocks' linears, the cell's wall time (model loading, the
method, calibration, evaluation), the model's stored size (``model.size_bytes``: packed integer
kernels with their scales, float parameters at 4 bytes) and, for cells run with ``eval.export``,
the size on disk of the orbax export and the perplexity of the model reloaded from it. A sweep
whose cells record ``ptq_perplexity`` (QAT with ``eval.before_qat``) gets one more column: the
perplexity of the PTQ model the cell's QAT started from.

Bits per weight: :math:`8 \\sum_l \\mathrm{bytes}_l / \\sum_l n_l` over the linears of the blocks
(paths ``layers/...``; scales and zero points included), with :math:`n_l` the float cell's
``bytes / 4`` of the same layer. The float embedding and an untied float LM head are not counted
(their size is in the stored size). ``--plot`` draws perplexity against these bits for every row
of every sweep (both axes log scale), one marker and colour per method family (:func:`family`, from the
cell's ``method`` config).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from experiments.sweep.pivot import ReportError, load_results

Record = Mapping[str, Any]


def ordered(records: Sequence[Record], order: Sequence[str] = ()) -> dict[str, Record]:
    """Records by ``variant``: the names in ``order`` first, then the rest."""
    found = {str(r["axes"]["variant"]): r for r in records}
    by_variant = {name: found[name] for name in order if name in found}
    by_variant.update({name: r for name, r in found.items() if name not in by_variant})
    return by_variant


def float_record(sweeps: Sequence[Mapping[str, Record]]) -> Record:
    """The finished ``float`` cell of the first sweep that has one."""
    for by_variant in sweeps:
        r = by_variant.get("float")
        if r is not None and r.get("status") == "ok":
            return r
    raise ReportError("no finished 'float' cell: run a sweep's float variant first")


def linear_bits(record: Record, float_rec: Record) -> float:
    """Stored bits per weight of the blocks' linears (see the module docstring)."""
    elements = {
        x["path"]: x["bytes"] / 4 for x in float_rec["model"]["layers"] if x["path"].startswith("layers/")
    }
    layers = [x for x in record["model"]["layers"] if x["path"] in elements]
    if not layers:
        raise ReportError(f"cell {record.get('cell')!r} records no block linears (model.layers)")
    return 8.0 * sum(x["bytes"] for x in layers) / sum(elements[x["path"]] for x in layers)


def llm_table(by_variant: Mapping[str, Record], float_rec: Record) -> str:
    """The markdown table of one sweep (see the module docstring)."""
    base = float_rec["metrics"]["perplexity"]
    start = any("ptq_perplexity" in (r.get("metrics") or {}) for r in by_variant.values())
    lines = [
        "| variant | perplexity | vs float | bits / weight | cell time (s) | stored size (MB) "
        "| export on disk (MB) / reloaded ppl |" + (" QAT from (PTQ ppl) |" if start else ""),
        "|---|---:|---:|---:|---:|---:|---|" + ("---:|" if start else ""),
    ]
    for name, r in by_variant.items():
        if r.get("status") != "ok":
            error = str(r.get("error") or "").splitlines()[0][:100]
            lines.append(f"| {name} | failed: {error} | | | | | |" + (" |" if start else ""))
            continue
        m, ppl = r["metrics"], r["metrics"]["perplexity"]
        export = (
            f"{m['export_bytes'] / 1e6:.1f} / {m['export_perplexity']:.3f}" if "export_bytes" in m else ""
        )
        ptq = f" {m['ptq_perplexity']:.3f} |" if "ptq_perplexity" in m else " |"
        lines.append(
            f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% | {linear_bits(r, float_rec):.2f} | "
            f"{r['protocol']['wall_time_s']:.0f} | {r['model']['size_bytes'] / 1e6:.1f} | {export} |"
            + (ptq if start else "")
        )
    return "\n".join(lines) + "\n"


def family(record: Record) -> str:
    """The plot's method family of a cell, from its ``method`` config: float, QAT, GPTQ, AWQ,
    LLM.int8(), SmoothQuant or RTN, with "+ rotation" where the model was rotated first."""
    m = (record.get("config") or {}).get("method") or {}
    name = m.get("name", "ptq")
    if name == "float":
        return "float"
    families = (
        ("QAT", name == "qat"),
        ("GPTQ", m.get("gptq")),
        ("AWQ", m.get("awq")),
        ("LLM.int8()", name == "llm_int8"),
        ("SmoothQuant", m.get("smoothquant_alpha") is not None),
    )
    base = next((label for label, chosen in families if chosen), "RTN")
    return base + (" + rotation" if m.get("rotation") else "")


def plot_bits(sweeps: Sequence[Mapping[str, Record]], float_rec: Record, path: pathlib.Path) -> None:
    """Perplexity (log) against stored bits per weight, every finished row of every sweep."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points: dict[str, list[tuple[float, float, str]]] = {}
    for by_variant in sweeps:
        for name, r in by_variant.items():
            if r.get("status") == "ok":
                bits = linear_bits(r, float_rec)
                points.setdefault(family(r), []).append((bits, r["metrics"]["perplexity"], name))
    fig = Figure(figsize=(10, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "o^svDP*XhH<>"
    for i, (label, pts) in enumerate(sorted(points.items())):
        ax.scatter(
            [p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=label, s=30
        )
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=5.5, xytext=(3, 2), textcoords="offset points")
    ax.axhline(float_rec["metrics"]["perplexity"], color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)  # spreads the 3-8 bit rows; float and LLM.int8() sit at 32
    ax.set_xticks([3, 4, 5, 6, 8, 16, 32], ["3", "4", "5", "6", "8", "16", "32"])
    ax.set_xlabel("stored bits per weight of the block linears (scales included; log scale)")
    ax.set_ylabel("perplexity (log scale; dashed: float)")
    ax.set_title("SmolLM2-135M: perplexity against stored bits per weight")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=150)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.scripts.llm_table", description=__doc__)
    parser.add_argument(
        "sweep_dirs", nargs="+", help="sweep directories of configs/llm/*.yaml, e.g. runs/llm_table"
    )
    parser.add_argument("--plot", type=pathlib.Path, help="write the perplexity-vs-bits figure here (PNG)")
    args = parser.parse_args(argv)
    try:
        sweeps = []
        for d in args.sweep_dirs:
            sweep_yaml = pathlib.Path(d) / "sweep.yaml"
            raw = yaml.safe_load(sweep_yaml.read_text()) if sweep_yaml.is_file() else {}
            order = [str(k) for k in ((raw.get("sweep") or {}).get("variant") or {})]
            sweeps.append(ordered(load_results(d), order))
        float_rec = float_record(sweeps)
        for d, by_variant in zip(args.sweep_dirs, sweeps, strict=True):
            if len(sweeps) > 1:
                print(f"\n{d}:\n")
            print(llm_table(by_variant, float_rec), end="")
        if args.plot is not None:
            plot_bits(sweeps, float_rec, args.plot)
    except ReportError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
