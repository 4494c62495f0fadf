"""Training curves in the report (experiments.sweep.curves): groups, means, the PNG and the section
of results.md, on records and metrics.jsonl files written here."""

import json
import pathlib

import matplotlib.image
import numpy as np
import pytest

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import curves, report
from experiments.sweep.schema import ExperimentConfig, Method, MethodConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = [10, 20, 30, 40]


def loss(method: str, seed: int, step: int) -> float:
    return (2.0 if method == "qat" else 1.5) * (1 + 0.1 * seed) / (1 + 0.05 * step)


def write_sweep(root: pathlib.Path, *, metrics: bool = True) -> list[dict]:
    """Cells ``method.name`` x ``seed``: qat and finetune over seeds 0, 1 (with metrics; the qat
    cell of seed 2 failed after logging two steps), and a float cell without metrics."""
    out = []
    cells = [("qat", 0), ("qat", 1), ("qat", 2), ("finetune", 0), ("finetune", 1), ("float", 0)]
    for method, seed in cells:
        cfg = ExperimentConfig(name="curves", seed=seed, method=MethodConfig(name=Method(method)))
        label = f"seed={seed},method.name={method}"
        run_dir = f"cells/{method}{seed}"
        failed = seed == 2
        record = {
            "cell": label,
            "hash": config_lib.config_hash(cfg),
            "axes": {"seed": seed, "method.name": method},
            "status": "failed" if failed else "ok",
            "error": "TrainingDiverged: loss nan" if failed else None,
            "metrics": {} if failed else {"accuracy": 0.9 + 0.01 * seed},
            "model": {},
            "layers": [],
            "protocol": {"seed": seed},
            "config": config_lib.to_dict(cfg),
            "run_dir": run_dir,
        }
        out.append(record)
        if method == "float" or not metrics:
            continue
        rows = [
            {"phase": phase, "step": s, "loss": loss(phase, seed, s), "lr": 0.1}
            for phase in ("float", method)
            for s in (STEPS[:2] if failed and phase != "float" else STEPS)
        ]
        (root / run_dir).mkdir(parents=True)
        torn = '{"phase": "qat", "st'  # a killed run's last line
        (root / run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    records.write_results(root, out)
    return out


def test_records_are_grouped_like_the_table_cells(tmp_path):
    recs = write_sweep(tmp_path)
    phases, missing = curves.read_curves(recs, tmp_path, ["seed"])
    assert list(phases) == ["float", "qat", "finetune"]
    assert list(phases["qat"]) == ["method.name=qat"] and list(phases["finetune"]) == ["method.name=finetune"]
    qat = phases["qat"]["method.name=qat"]
    assert [(c.cell, c.ok) for c in qat] == [
        ("seed=0,method.name=qat", True),
        ("seed=1,method.name=qat", True),
        ("seed=2,method.name=qat", False),
    ]
    assert list(qat[2].steps) == STEPS[:2]  # the torn last line of the file is skipped
    assert missing == ["seed=0,method.name=float"]
    steps, mean = curves.mean_curve(qat)  # the failed cell stays out of the mean
    assert list(steps) == STEPS
    np.testing.assert_allclose(mean, [(loss("qat", 0, s) + loss("qat", 1, s)) / 2 for s in STEPS], rtol=1e-12)
    pooled, _ = curves.read_curves(recs, tmp_path, ["seed", "method.name"])
    assert list(pooled["float"]) == ["all cells"] and len(pooled["float"]["all cells"]) == 5
    separate, _ = curves.read_curves(recs, tmp_path, [])
    assert len(separate["qat"]) == 3


def test_curves_png_and_its_section(tmp_path):
    recs = write_sweep(tmp_path)
    out = curves.render_curves(recs, tmp_path, title="curves")
    assert out.png is not None and out.png.startswith(PNG_MAGIC)
    (tmp_path / "c.png").write_bytes(out.png)
    image = matplotlib.image.imread(tmp_path / "c.png")
    assert image.shape[1] > 2 * image.shape[0] and image.std() > 0.01  # three panels, drawn
    assert "## Training curves" in out.markdown and f"]({curves.FILE})" in out.markdown
    assert "1 of 6 cells have no training metrics" in out.markdown
    assert "`seed=0,method.name=float`" in out.markdown


def test_the_report_writes_curves_only_where_cells_have_metrics(tmp_path):
    write_sweep(tmp_path / "new")
    paths = report.render(tmp_path / "new")
    assert paths["curves.png"].read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "new" / "results.md").read_text()
    assert "![training loss by step](curves.png)" in md
    write_sweep(tmp_path / "old", metrics=False)  # a sweep run before tracking
    paths = report.render(tmp_path / "old")
    assert "curves.png" not in paths and not (tmp_path / "old" / "curves.png").exists()
    md = (tmp_path / "old" / "results.md").read_text()
    assert "## Training curves" in md and "6 of 6 cells have no training metrics" in md
    assert "curves.png" not in md


@pytest.mark.parametrize("rows", [[], [{"phase": "qat", "step": 1}]])
def test_cells_without_losses_are_named(tmp_path, rows):
    (tmp_path / "cells" / "a").mkdir(parents=True)
    (tmp_path / "cells" / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = curves.render_curves([{"cell": "a", "axes": {}, "run_dir": "cells/a", "status": "ok"}], tmp_path)
    assert out.png is None and "1 of 1 cells have no training metrics" in out.markdown
