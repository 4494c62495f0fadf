"""Records that never mix: a sweep rerun into its directory with a changed override is refused
with the difference shown (before anything is written), and a report never averages records of
configs that differ outside the sweep axes."""

import pytest

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import pivot, run
from experiments.sweep.schema import ReportConfig
from tests import ROOT

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"
ARGS = ["sweep.method.name=[ptq]", "train.epochs=1", "eval.serve=false", "eval.diagnostics=false"]


def test_a_changed_rerun_is_refused_with_the_difference(tmp_path):
    sweep_dir = run.run_sweep(config_lib.load(SMOKE, [f"output_dir={tmp_path}", *ARGS]))
    before = {p.name: p.read_bytes() for p in sweep_dir.iterdir() if p.is_file()}
    changed = config_lib.load(SMOKE, [f"output_dir={tmp_path}", *ARGS, "calibration.batches=1"])
    with pytest.raises(
        config_lib.ConfigError, match=r"method.name=ptq \(calibration.batches: 2 -> 1\).*own name="
    ):
        run.run_sweep(changed)
    assert {p.name: p.read_bytes() for p in sweep_dir.iterdir() if p.is_file()} == before
    # the same config again: nothing to do; keys outside the hash (mesh, report): the same cells
    again = config_lib.load(SMOKE, [f"output_dir={tmp_path}", *ARGS, "report.metric=loss"])
    assert records.read_results(run.run_sweep(again)) == records.read_results(sweep_dir)
    # the changed config under its own name runs
    own = config_lib.load(SMOKE, [f"output_dir={tmp_path}", *ARGS, "calibration.batches=1", "name=one_batch"])
    assert [r["status"] for r in records.read_results(run.run_sweep(own))] == ["ok"]


def record(cell, seed, lr, accuracy):
    return {
        "cell": cell,
        "status": "ok",
        "axes": {"seed": seed},
        "metrics": {"accuracy": accuracy},
        "config": {"seed": seed, "method": {"name": "qat"}, "train": {"learning_rate": lr}},
    }


def test_a_report_never_pools_records_of_different_configs():
    same = [record("seed=0", 0, 0.01, 0.9), record("seed=1", 1, 0.01, 0.8)]
    stat = pivot.pivot(same, ReportConfig()).tables[0].stats[(("qat",), ("qat",))]
    assert stat.n == 2 and stat.mean == pytest.approx(0.85)
    mixed = [record("seed=0", 0, 0.01, 0.9), record("seed=1", 1, 0.02, 0.8)]
    with pytest.raises(
        pivot.ReportError,
        match=r"qat / qat would average records of different configs .*train.learning_rate: 0.01 vs 0.02",
    ):
        pivot.pivot(mixed, ReportConfig())
