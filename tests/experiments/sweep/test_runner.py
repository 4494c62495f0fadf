"""The experiment runner end to end on sklearn digits: a two-cell sweep, resume after a kill,
skipping finished cells, failing cells, dry runs, atomic results, the protocol record and the
training metrics of every phase."""

import json
import math
import os
import pathlib

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import run, runner, tracking
from qjax import training
from tests import ROOT

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"


def spec_at(out: pathlib.Path, *overrides: str) -> config_lib.SweepSpec:
    return config_lib.load(SMOKE, [f"output_dir={out}", *overrides])


def ok_records(sweep_dir: pathlib.Path) -> dict[str, dict]:
    return {r["cell"]: r for r in records.read_results(sweep_dir) if r["status"] == "ok"}


def training_rows(sweep_dir: pathlib.Path, record: dict) -> list[dict]:
    return tracking.read_metrics(sweep_dir / record["run_dir"] / "metrics.jsonl")


def event_steps(sweep_dir: pathlib.Path, record: dict, phase: str) -> list[int]:
    """The steps of ``<phase>/loss`` as TensorBoard reads the cell's event files (purges applied)."""
    acc = event_accumulator.EventAccumulator(str(sweep_dir / record["run_dir"] / "tb" / phase))
    acc.Reload()
    return [e.step for e in acc.Scalars(f"{phase}/loss")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    sweep_dir = run.run_sweep(spec_at(out, "method.steps=40", "train.checkpoint_every=10"))
    return sweep_dir, ok_records(sweep_dir)


def test_two_cell_sweep_end_to_end(uninterrupted):
    sweep_dir, recs = uninterrupted
    assert set(recs) == {"method.name=ptq", "method.name=qat"}
    for r in recs.values():
        assert 0.5 < r["metrics"]["accuracy"] <= 1.0
        assert r["metrics"]["serve_accuracy"] == pytest.approx(r["metrics"]["accuracy"], abs=0.01)
        assert {"bits_per_weight", "size_bytes", "energy_pj"} <= set(r["model"])
        assert r["layers"] and all("weight_sqnr_db" in row for row in r["layers"])
        p = r["protocol"]
        for key in (
            "config_hash",
            "seed",
            "git_commit",
            "jax",
            "flax",
            "qjax",
            "device",
            "dataset_sha256",
            "calibration",
            "wall_time_s",
        ):
            assert key in p, key
        cell_dir = sweep_dir / r["run_dir"]
        assert json.loads((cell_dir / "metrics.json").read_text())["hash"] == r["hash"]
        assert config_lib.load(cell_dir / "config.yaml").base == config_lib.from_dict(r["config"])
        assert (cell_dir / "log.txt").read_text().count("metrics") == 1
    for name in ("results.md", "results.csv", "results.png", "layers.md", "sweep.yaml"):
        assert (sweep_dir / name).stat().st_size > 0


def test_rerun_skips_finished_cells(uninterrupted, monkeypatch):
    sweep_dir, recs = uninterrupted
    calls = []
    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: calls.append(a) or {})
    run.run_sweep(spec_at(sweep_dir.parent, "method.steps=40", "train.checkpoint_every=10"))
    assert calls == []
    assert ok_records(sweep_dir) == recs


def kill_after(monkeypatch, step: int, where: str) -> None:
    """Raise SystemExit (not caught as a failed cell) right after the checkpoint of ``step`` in a
    checkpoint directory whose path contains ``where``: what disk holds after a kill."""
    original = training.TrainingCheckpointer.save

    def save(self, s, *args, **kwargs):
        saved = original(self, s, *args, **kwargs)
        if s == step and where in str(self.directory):
            raise SystemExit(f"killed after step {s}")
        return saved

    monkeypatch.setattr(training.TrainingCheckpointer, "save", save)


@pytest.mark.parametrize("where", ["float", "cells"], ids=["float-training", "qat-fine-tuning"])
def test_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, monkeypatch, where):
    _, expected = uninterrupted
    spec = spec_at(tmp_path, "method.steps=40", "train.checkpoint_every=10")
    with monkeypatch.context() as m:
        kill_after(m, 20, where)
        with pytest.raises(SystemExit, match="killed after step 20"):
            run.run_sweep(spec)
    sweep_dir = run.run_sweep(spec)
    got = ok_records(sweep_dir)
    whole_dir = uninterrupted[0]
    for cell, record in expected.items():
        assert got[cell]["metrics"] == record["metrics"], cell
        # the training metrics: no step lost or logged twice, in the file and in TensorBoard
        rows, want = training_rows(sweep_dir, got[cell]), training_rows(whole_dir, record)
        assert [(r["phase"], r["step"]) for r in rows] == [(r["phase"], r["step"]) for r in want]
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in want], rtol=1e-5)
        for phase in dict.fromkeys(r["phase"] for r in want):
            steps = [r["step"] for r in want if r["phase"] == phase]
            assert event_steps(sweep_dir, got[cell], phase) == steps
    logs = "".join(p.read_text() for p in sweep_dir.glob("cells/*/log.txt"))
    assert "resuming at step 20" in logs


def test_every_training_phase_of_every_cell_is_tracked(uninterrupted):
    """metrics.jsonl and TensorBoard: the float model's training (logged once, copied into both
    cells) and QAT, every 10th step and the last, with the schedule's learning rate; the report
    draws the curves."""
    sweep_dir, recs = uninterrupted
    ptq, qat = recs["method.name=ptq"], recs["method.name=qat"]
    cfg = config_lib.from_dict(qat["config"])
    n_float = 2 * (len(runner.load_task(cfg).train) // cfg.train.batch_size)  # train.epochs: 2
    float_rows = [r for r in training_rows(sweep_dir, qat) if r["phase"] == "float"]
    assert [r["step"] for r in float_rows] == [*range(10, n_float, 10), n_float]
    assert training_rows(sweep_dir, ptq) == float_rows
    assert tracking.read_metrics(runner.float_metrics_path(cfg, sweep_dir)) == float_rows
    qat_rows = [r for r in training_rows(sweep_dir, qat) if r["phase"] == "qat"]
    assert [r["step"] for r in qat_rows] == [10, 20, 30, 40]
    for rows, lr, steps in (
        (float_rows, cfg.train.learning_rate, n_float),
        (qat_rows, cfg.method.learning_rate, 40),
    ):
        for r in rows:
            assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
            cosine = lr * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / steps))  # optax, in float64
            assert r["lr"] == pytest.approx(cosine, rel=1e-6, abs=1e-7 * lr)
    clipped = {f"quantizer/{p}/weight_clip_fraction" for p in ("fc1", "fc2", "head")}
    assert {k for k in qat_rows[0] if k.startswith("quantizer/")} == clipped  # ste: nothing learned
    for phase, rows in (("float", float_rows), ("qat", qat_rows)):
        assert event_steps(sweep_dir, qat, phase) == [r["step"] for r in rows]
    assert (sweep_dir / "curves.png").stat().st_size > 0
    assert "![training loss by step](curves.png)" in (sweep_dir / "results.md").read_text()


def test_failing_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    original = runner.apply_method

    def flaky(cfg, *args, **kwargs):
        if cfg.method.name == "ptq":
            raise RuntimeError("simulated failure in the ptq cell")
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(runner, "apply_method", flaky)
    sweep_dir = run.run_sweep(spec_at(tmp_path, "method.steps=5"))
    recs = {r["cell"]: r for r in records.read_results(sweep_dir)}
    assert recs["method.name=ptq"]["status"] == "failed"
    assert recs["method.name=ptq"]["error"] == "RuntimeError: simulated failure in the ptq cell"
    assert recs["method.name=qat"]["status"] == "ok"
    assert "simulated failure" in (sweep_dir / "results.md").read_text()
    with pytest.raises(RuntimeError, match="simulated failure"):
        run.run_sweep(spec_at(tmp_path / "again", "method.steps=5"), fail_fast=True)


def test_dry_run_prints_the_grid_and_runs_nothing(tmp_path, capsys):
    assert run.main([str(SMOKE), f"output_dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cells" in out and "method.name=ptq" in out and "method.name=qat" in out
    assert "[method=ptq W=int4 A=int8]" in out  # brackets printed, not taken for rich markup
    assert not any(tmp_path.iterdir())


def test_invalid_config_fails_before_any_compute(tmp_path, capsys):
    code = run.main([str(SMOKE), f"output_dir={tmp_path}", "train.epoch=3", "quant.weights.dtype=int9"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.epoch: unknown key; did you mean 'train.epochs'?" in err
    assert "dtype='int9' is not a known format" in err
    assert not any(tmp_path.iterdir())


def test_layer_incompatible_spec_is_named_before_compute(tmp_path, capsys):
    overrides = ["quant.weights.granularity=per_group", "quant.weights.axis=0", "quant.weights.group_size=7"]
    code = run.main([str(SMOKE), f"output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert "layer 'fc1'" in err and "group_size=7 does not divide axis 0 of size 64" in err
    assert not (tmp_path / "digits_smoke" / "results.jsonl").exists()


def test_results_are_written_atomically(tmp_path, monkeypatch):
    sweep_dir = tmp_path
    records.write_results(sweep_dir, [{"cell": "a", "status": "ok"}])
    before = (sweep_dir / records.RESULTS).read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        records.upsert_result(sweep_dir, {"cell": "b", "status": "ok"})
    assert (sweep_dir / records.RESULTS).read_bytes() == before
    assert sorted(p.name for p in sweep_dir.iterdir()) == [records.RESULTS, f"{records.RESULTS}.lock"]


def test_finetune_is_qat_without_quantizers(tmp_path):
    """``finetune`` trains the float model as QAT would (same steps, optimizer, data order) with no
    quantized layer; with a learning rate of 1e-12 it must score as the float model does."""
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(
        f"base: {SMOKE}\nname: ft\nmethod: {{steps: 20}}\nsweep: {{method.name: [float, finetune]}}\n"
    )
    frozen_dir = run.run_sweep(config_lib.load(cfg, [f"output_dir={tmp_path}", "method.learning_rate=1e-12"]))
    recs = ok_records(frozen_dir)
    frozen, base = recs["method.name=finetune"], recs["method.name=float"]
    assert frozen["metrics"]["accuracy"] == base["metrics"]["accuracy"]
    assert frozen["metrics"]["loss"] == pytest.approx(base["metrics"]["loss"], rel=1e-5)
    assert frozen["layers"] == [] and frozen["model"]["bits_per_weight"] == 32.0
    moved_dir = run.run_sweep(config_lib.load(cfg, [f"output_dir={tmp_path}", "name=moved"]))
    moved = ok_records(moved_dir)["method.name=finetune"]
    assert moved["metrics"]["loss"] != base["metrics"]["loss"]  # 20 steps of training moved the weights


def test_cells_finished_before_a_schema_field_was_added_stay_finished(uninterrupted):
    """A record written before a config field existed (its config lacks the field, its hash is that
    of the older schema) still marks its cell finished: its config is re-read with today's schema."""
    sweep_dir, recs = uninterrupted
    spec = config_lib.load(sweep_dir / "sweep.yaml")
    old = []
    for r in recs.values():
        r = json.loads(json.dumps(r))
        del r["config"]["method"]["smoothquant_alpha"], r["config"]["eval"]["export"]
        r["hash"] = "0" * 64  # the older schema hashed a different dict
        old.append(r)
    done = run.finished_hashes(old)
    assert {c.hash for c in spec.cells()} <= done
    assert run.finished_hashes([{**old[0], "config": {"method": {"name": 3}}}]) == {"0" * 64}


def test_export_saves_and_reloads_the_converted_model(tmp_path):
    """``eval.export``: the converted model saved with orbax and restored into an abstract copy of
    its structure scores exactly what the model did, and its size on disk is recorded; both run
    on the kernel path ``eval.kernels`` names (here the kernels' references)."""
    sweep_dir = run.run_sweep(
        spec_at(tmp_path, "eval.export=true", "method.steps=5", "eval.kernels=reference")
    )
    recs = ok_records(sweep_dir)
    for r in recs.values():
        m = r["metrics"]
        assert m["export_accuracy"] == m["serve_accuracy"]
        assert m["export_loss"] == pytest.approx(m["serve_loss"], rel=1e-6)
        assert 0 < m["export_bytes"] < 100 * r["model"]["size_bytes"]
        assert (sweep_dir / r["run_dir"] / "export").is_dir()


def test_quantized_training_from_scratch_records_the_gradient_sqnr(tmp_path):
    """``method.from_scratch``: QAT trains the initial model as ``train`` says (no float model is
    trained); a cell whose rules quantize the backward pass records each layer's kernel-gradient
    SQNR."""
    cfg = tmp_path / "qt.yaml"
    cfg.write_text(
        f"base: {SMOKE}\nname: qt\n"
        "method: {name: qat, from_scratch: true}\n"
        "quant: {activation_scale: dynamic, gradients: {dtype: int8, granularity: per_channel}}\n"
        "eval: {serve: false}\nsweep: {method.name: [qat]}\n"
    )
    sweep_dir = run.run_sweep(config_lib.load(cfg, [f"output_dir={tmp_path}"]))
    (rec,) = ok_records(sweep_dir).values()
    assert not (tmp_path / "float-models").exists()
    sqnr = rec["gradient_sqnr_db"]
    assert set(sqnr) == {"fc1", "fc2", "head"} and all(10 < v < 100 for v in sqnr.values()), sqnr
    assert rec["metrics"]["grad_sqnr_db"] == pytest.approx(np.mean(list(sqnr.values())))
    assert rec["metrics"]["accuracy"] > 0.5  # the train section's 2 epochs, from scratch, on digits


def test_finetune_from_scratch_is_the_float_training(tmp_path):
    """The float baseline of a quantized-training study: ``finetune`` from scratch runs the train
    section on the initial model, so it scores as the trained float model."""
    cfg = tmp_path / "fs.yaml"
    cfg.write_text(
        f"base: {SMOKE}\nname: fs\neval: {{serve: false}}\n"
        "sweep: {method.name: null, variant: {float: {method.name: float}, "
        "scratch: {method.name: finetune, method.from_scratch: true}}}\n"
    )
    recs = ok_records(run.run_sweep(config_lib.load(cfg, [f"output_dir={tmp_path}"])))
    trained, scratch = recs["variant=float"]["metrics"], recs["variant=scratch"]["metrics"]
    assert scratch["accuracy"] == trained["accuracy"]
    assert scratch["loss"] == pytest.approx(trained["loss"], rel=1e-5)


def test_a_non_finite_gradient_sqnr_is_recorded_as_none_not_as_a_failure(tmp_path, monkeypatch):
    """An exact quantized gradient has SQNR inf: the cell stays ok, the record stays JSON and the
    mean is over the finite layers."""
    import qjax

    monkeypatch.setattr(qjax.nn, "gradient_sqnr", lambda *a: {"fc1": math.inf, "fc2": 20.0, "head": 30.0})
    cfg = tmp_path / "qt.yaml"
    cfg.write_text(
        f"base: {SMOKE}\nname: qt\nmethod: {{name: qat, from_scratch: true}}\n"
        "quant: {activation_scale: dynamic, gradients: {dtype: int8}}\n"
        "eval: {serve: false}\nsweep: {method.name: [qat]}\n"
    )
    (rec,) = ok_records(run.run_sweep(config_lib.load(cfg, [f"output_dir={tmp_path}"]))).values()
    assert rec["gradient_sqnr_db"] == {"fc1": None, "fc2": 20.0, "head": 30.0}
    assert rec["metrics"]["grad_sqnr_db"] == 25.0
