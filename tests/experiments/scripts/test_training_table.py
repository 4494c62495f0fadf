"""The study 8 table from records: means, paired differences and gradient SQNR columns."""

import pytest

from experiments.scripts import training_table
from experiments.sweep.pivot import ReportError


def record(variant, seed, accuracy, sqnr=None, status="ok"):
    return {
        "cell": f"seed={seed},variant={variant}",
        "status": status,
        "axes": {"seed": seed, "variant": variant},
        "config": {"seed": seed},
        "metrics": {"accuracy": accuracy},
        "gradient_sqnr_db": sqnr or {},
        "protocol": {"wall_time_s": 10.0 * (seed + 1)},
    }


def test_table_pairs_by_seed_and_averages_the_layers():
    records = [
        record("float", 0, 0.90),
        record("float", 1, 0.80),
        record("full", 0, 0.85, {"fc": 20.0}),
        record("full", 1, 0.77, {"fc": 30.0}),
        record("full", 2, 0.10, {"fc": 99.0}, status="error"),
        record("other", 0, 0.90, {"fc": None}),
    ]
    lines = training_table.table(records, digits=2).splitlines()
    assert lines[0] == "| variant | accuracy (mean ± std) | vs float, paired by seed | fc dB |"
    assert lines[2] == "| float | 0.85 ± 0.07 | - | - |"
    # differences -0.05 and -0.03 paired by seed: mean -0.04, std 0.014
    assert lines[3] == "| full | 0.81 ± 0.06 | -0.04 ± 0.01 | 25.0 |"
    assert lines[4] == "| other | 0.90 (n=1) | 0.00 (n=1) | - |"  # a non-finite SQNR is recorded as None
    assert training_table.wall_times(records) == {"float": 15.0, "full": 15.0, "other": 10.0}


def test_records_without_variant_are_refused():
    bad = record("float", 0, 0.9)
    bad["axes"] = {"seed": 0}
    with pytest.raises(ReportError, match="no 'variant' axis"):
        training_table.table([bad])


def test_loss_curves_are_read_per_cell_and_plotted(tmp_path):
    import json

    records = []
    for variant, offset in (("float", 0.0), ("full", 0.5)):
        for seed in (0, 1):
            r = record(variant, seed, 0.9)
            r["run_dir"] = f"cells/{variant}{seed}"
            (tmp_path / r["run_dir"]).mkdir(parents=True)
            rows = [{"phase": "qat", "step": t, "loss": 1.0 / t + offset + seed} for t in (10, 20, 30)]
            (tmp_path / r["run_dir"] / "metrics.jsonl").write_text(
                "".join(json.dumps(x) + "\n" for x in rows)
            )
            records.append(r)
    curves = training_table.loss_curves(tmp_path, records)
    assert curves["full"][1] == {10: 1.6, 20: 1.55, 30: pytest.approx(1.5 + 1 / 30)}
    out = tmp_path / "curves.png"
    training_table.plot_curves(curves, out, smooth=2)
    assert out.stat().st_size > 1000 and not list(tmp_path.glob("*.tmp.png"))
