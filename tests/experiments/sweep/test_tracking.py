"""Training metrics (experiments.sweep.tracking): quantizer statistics against numpy, a killed and
resumed phase (metrics.jsonl and TensorBoard), a shared phase copied into a cell, W&B offline and
MLflow file stores, and the ``tracking:`` config section. A sweep's metrics end to end:
tests/experiments/sweep/test_runner.py."""

import json
import math
import pathlib
import struct

import flax.nnx as nnx
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import qjax
from experiments.sweep import config as config_lib
from experiments.sweep import run, tracking, train_loop
from experiments.sweep.schema import Optimizer, Schedule, TaskConfig, TrackingConfig
from experiments.tasks import get_task
from qjax import training
from tests import ROOT

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"


def scalars(directory: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars TensorBoard reads from a run directory (purges of resumed steps applied)."""
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_quantizer_statistics_match_numpy():
    """Means of the learned LSQ scales and PACT clips, and the fraction of kernel elements whose
    code clipping changes, |round(w / s)| > 7 (int4, per output channel), after the scales were
    shrunk to clip about half."""
    rule = qjax.nn.Rule(
        path=".*",
        weights=qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1),
        activations=qjax.QuantSpec(dtype="int8"),
        weight_estimator="lsq",
        activation_estimator="pact",
    )
    task = get_task(TaskConfig())
    model = qjax.nn.quantize_model(task.make_model("mlp", {}, 0), [rule])
    qjax.nn.calibrate(model, [task.train.take(np.arange(128))[0]])
    op = model.fc1.dot_general
    kernel = np.float64(model.fc1.kernel[...])
    op.weight_scale[...] = jax.numpy.asarray(np.median(np.abs(kernel), axis=0, keepdims=True) / 7, "float32")
    got = jax.device_get(nnx.jit(tracking.quantizer_statistics)(model))
    scale = np.float64(op.weight_scale[...])
    want = np.mean(np.abs(np.round(kernel / scale)) > 7)
    assert 0.3 < want < 0.7
    assert float(got["quantizer/fc1/weight_clip_fraction"]) == pytest.approx(want, abs=1e-9)
    assert float(got["quantizer/fc1/weight_scale"]) == pytest.approx(np.mean(scale), rel=1e-6)
    assert float(got["quantizer/fc2/act_clip"]) == pytest.approx(float(model.fc2.dot_general.act_clip[...]))
    names = ("weight_scale", "act_clip", "weight_clip_fraction")
    assert set(got) == {f"quantizer/{p}/{n}" for p in ("fc1", "fc2", "head") for n in names}


def train_tracked(tmp: pathlib.Path, steps: int = 10) -> list[dict]:
    """Train the digits MLP for ``steps`` steps (checkpoints every 4, a row every 2) with a tracker."""
    task = get_task(TaskConfig())
    schedule = train_loop.make_schedule(3e-3, Schedule.COSINE, steps)
    tx = train_loop.make_tx(Optimizer.ADAM, 3e-3, Schedule.COSINE, steps)
    config = TrackingConfig(log_every=2)
    with tracking.Tracker(tmp / "cell", config, sweep_dir=tmp, name="cell", run_config={}) as tracker:
        monitor = tracking.Monitor(phase="float", observer=tracker, learning_rate=schedule, log_every=2)
        train_loop.train(
            task,
            task.make_model("mlp", {}, 0),
            tx,
            steps=steps,
            batch_size=64,
            seed=0,
            checkpoint_dir=tmp / "ckpt",
            checkpoint_every=4,
            keep=2,
            monitor=monitor,
        )
    return tracking.read_metrics(tmp / "cell" / "metrics.jsonl")


def test_a_killed_phase_resumes_without_losing_or_repeating_rows(tmp_path, monkeypatch):
    """Killed after step 7 (rows 2, 4, 6 logged, checkpoint at 4), resumed: the row after the
    checkpoint is dropped and logged again by the resumed run, the rows up to the checkpoint stay
    as they were, and TensorBoard reads each step once (the killed run's events purged)."""
    original = training.TrainingCheckpointer.save

    def save(self, step, *args, **kwargs):
        saved = original(self, step, *args, **kwargs)
        if step == 7:
            raise SystemExit("killed after step 7")
        return saved

    with monkeypatch.context() as m:
        m.setattr(training.TrainingCheckpointer, "save", save)
        with pytest.raises(SystemExit):
            train_tracked(tmp_path)
    partial = tracking.read_metrics(tmp_path / "cell" / "metrics.jsonl")
    assert [r["step"] for r in partial] == [2, 4, 6]
    rows = train_tracked(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    assert rows[:2] == partial[:2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    tb = tmp_path / "cell" / "tb" / "float"
    assert [s for s, _ in scalars(tb)["float/loss"]] == [2, 4, 6, 8, 10]
    assert [v for _, v in scalars(tb)["float/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert len(list(tb.iterdir())) == 2  # one event file per run; the second purges the first


def test_a_cell_copies_the_rows_of_a_shared_phase(tmp_path):
    """A phase logged elsewhere (the float model's file) is copied into the cell's file and event
    files up to the step it starts from, once however often the cell begins it; non-finite values
    are null in the file and left out of the event files."""
    source = tmp_path / "float.metrics.jsonl"
    history = tracking.History(source)
    history.begin("float", 0, 6)
    for step in (2, 4, 6):
        history.log("float", step, {"loss": 1.0 / step, "lr": 0.1, "grad_norm": 2.0})
    for _ in range(2):
        with tracking.Tracker(
            tmp_path / "cell",
            TrackingConfig(),
            sweep_dir=tmp_path,
            name="c",
            run_config={},
            sources={"float": source},
        ) as tracker:
            tracker.begin("float", 6, 6)
            tracker.begin("qat", 0, 2)
            tracker.log(
                "qat", 2, {"loss": 0.5, "lr": 0.01, "grad_norm": 1.0, "quantizer/l/weight_scale": math.nan}
            )
    rows = tracking.read_metrics(tmp_path / "cell" / "metrics.jsonl")
    assert [(r["phase"], r["step"]) for r in rows] == [("float", 2), ("float", 4), ("float", 6), ("qat", 2)]
    assert rows[-1]["quantizer/l/weight_scale"] is None  # strict JSON: NaN as null
    assert [s for s, _ in scalars(tmp_path / "cell" / "tb" / "float")["float/loss"]] == [2, 4, 6]
    qat = scalars(tmp_path / "cell" / "tb" / "qat")
    assert [s for s, _ in qat["qat/loss"]] == [2] and "qat/quantizer/l/weight_scale" not in qat


def wandb_history(path: pathlib.Path) -> list[dict]:
    """The history rows of an offline ``.wandb`` file: after a 7-byte header, records in 32 KiB
    blocks (each chunk: crc32 (4), length (2), type (1: whole, 2-4: first, middle, last), data),
    each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    rows, chunk = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or length == kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
            chunk = b""
    return rows


def test_wandb_offline_and_mlflow_file_store(tmp_path):
    pytest.importorskip("wandb", reason="the tracking extra is not installed")
    pytest.importorskip("mlflow", reason="the tracking extra is not installed")
    config = TrackingConfig(log_every=1, tensorboard=False, wandb=True, mlflow=True, project="proj")
    run_config = {"name": "sweep", "train": {"learning_rate": 0.003}}
    with tracking.Tracker(
        tmp_path / "cells" / "a", config, sweep_dir=tmp_path, name="a", run_config=run_config
    ) as t:
        t.begin("qat", 0, 3)
        for step in (1, 2, 3):
            t.log("qat", step, {"loss": 1.0 / step, "lr": 0.01, "grad_norm": 2.0})
    (wandb_file,) = (tmp_path / "cells" / "a" / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(wandb_file)
    assert [(h["qat/step"], h["qat/loss"]) for h in history] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    (run_dir,) = [p for p in (tmp_path / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    lines = (run_dir / "metrics" / "qat" / "loss").read_text().split("\n")
    logged = [(int(step), float(value)) for _, value, step in (line.split() for line in lines if line)]
    assert logged == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert (run_dir / "params" / "train.learning_rate").read_text() == "0.003"
    assert "status: 3" in (run_dir / "meta.yaml").read_text()  # RunStatus.FINISHED
    assert "name: proj" in (run_dir.parent / "meta.yaml").read_text()


def test_tracking_config_is_checked_and_stays_out_of_the_hash(tmp_path, monkeypatch, capsys):
    base = [f"output_dir={tmp_path}"]
    cell = config_lib.load(SMOKE, base).cells()[0]
    other = config_lib.load(SMOKE, [*base, "tracking.log_every=1", "tracking.tensorboard=false"]).cells()[0]
    assert cell.hash == other.hash and cell.slug == other.slug
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(SMOKE, [*base, "tracking.log_every=-1", "tracking.log_evry=3"])
    assert "tracking.log_every: must be >= 0, got -1" in str(info.value)
    assert "tracking.log_evry: unknown key; did you mean 'tracking.log_every'?" in str(info.value)
    monkeypatch.setattr(tracking, "installed", lambda module: module not in ("wandb", "mlflow"))
    code = run.main([str(SMOKE), *base, "tracking.wandb=true", "tracking.mlflow=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tracking.wandb: true, but wandb is not installed: pip install wandb" in err
    assert "tracking.mlflow: true, but mlflow is not installed: pip install mlflow" in err
    assert not any(tmp_path.iterdir())  # refused before any compute
