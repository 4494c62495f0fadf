"""Damaged checkpoints (``qjax.training.integrity``, ``TrainingCheckpointer.restore``): bytes
overwritten at several offsets of several files, a truncated or deleted file, garbage metadata,
non-finite values saved, every step damaged. The restore falls back to the latest step that
verifies, reads and is finite, and says so; when none does, the error names the directory and
what to do. Never a silent restore of changed bytes."""

import logging
import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import run
from qjax import training
from qjax.training import integrity
from tests import ROOT

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"


def model_and_optimizer(seed=0):
    model = nnx.Linear(16, 32, rngs=nnx.Rngs(seed))
    return model, training.make_optimizer(model, optax.adam(1e-2))


def values(node):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(node))]


@pytest.fixture
def three_steps(tmp_path):
    """Steps 1, 2, 3 of a model whose kernel is filled with the step number; the values of each."""
    model, optimizer = model_and_optimizer()
    saved = {}
    with training.TrainingCheckpointer(tmp_path / "ckpt", keep=3) as ckpt:
        for step in (1, 2, 3):
            model.kernel.set_value(jnp.full((16, 32), float(step)))
            ckpt.save(step, model, optimizer, data={"step": step})
            saved[step] = values(model)
    return tmp_path / "ckpt", saved


def restore(directory, step=None):
    model, optimizer = model_and_optimizer(seed=1)
    with training.TrainingCheckpointer(directory, keep=3) as ckpt:
        restored = ckpt.restore(model, optimizer, step=step)
    return restored, values(model)


def largest_file(step_dir):
    return max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.name != integrity.MANIFEST),
        key=lambda p: p.stat().st_size,
    )


def overwrite(path, offset, n=256):
    data = bytearray(path.read_bytes())
    offset = min(offset, max(len(data) - n, 0))
    data[offset : offset + n] = b"\xff" * min(n, len(data) - offset)
    path.write_bytes(bytes(data))


def test_every_step_is_sealed_and_verifies(three_steps):
    directory, saved = three_steps
    for step in (1, 2, 3):
        assert integrity.verify(directory / str(step)) is None
    restored, got = restore(directory)
    assert restored.step == 3 and restored.data == {"step": 3}
    for a, b in zip(got, saved[3], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("which", ["largest data file", "orbax metadata", "item metadata"])
def test_overwritten_bytes_fall_back_to_the_previous_step(three_steps, caplog, which, where):
    directory, saved = three_steps
    step_dir = directory / "3"
    files = {
        "largest data file": largest_file(step_dir),
        "orbax metadata": step_dir / "_CHECKPOINT_METADATA",
        "item metadata": next(
            p for p in (step_dir / "model").rglob("*") if p.is_file() and "METADATA" in p.name
        ),
    }
    target = files[which]
    size = target.stat().st_size
    overwrite(target, {"start": 0, "middle": size // 2, "end": size}[where], n=min(256, size))
    with caplog.at_level(logging.WARNING, logger="qjax.training"):
        restored, got = restore(directory)
    assert restored.step == 2
    for a, b in zip(got, saved[2], strict=True):
        np.testing.assert_array_equal(a, b)
    assert (
        f"checkpoint step 3 in {directory} is damaged: file {target.relative_to(step_dir).as_posix()}"
        in caplog.text
    )
    assert "restored step 2" in caplog.text
    assert [p.name.split("-")[0] for p in (directory.parent / "ckpt.damaged").iterdir()] == ["3"]


@pytest.mark.parametrize("damage", ["truncated", "deleted", "manifest garbage"])
def test_truncated_deleted_or_unreadable_checksums_fall_back(three_steps, damage):
    directory, saved = three_steps
    step_dir = directory / "3"
    target = largest_file(step_dir)
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        want = r"has \d+ bytes, \d+ when saved"
    elif damage == "deleted":
        target.unlink()
        want = r"is missing"
    else:
        (step_dir / integrity.MANIFEST).write_bytes(b"\x00garbage")
        want = r"checksum file qjax_checksums.json is unreadable"
    assert integrity.verify(step_dir) is not None
    assert re.search(want, integrity.verify(step_dir))
    restored, got = restore(directory)
    assert restored.step == 2
    np.testing.assert_array_equal(got[-1], saved[2][-1])


def test_an_unsealed_step_restores_unverified_with_a_warning(three_steps, caplog):
    directory, _ = three_steps
    (directory / "3" / integrity.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="qjax.training"):
        restored, _ = restore(directory)
    assert restored.step == 3 and "has no checksums: restored unverified" in caplog.text


def test_non_finite_values_are_not_restored(tmp_path):
    model, optimizer = model_and_optimizer()
    with training.TrainingCheckpointer(tmp_path, keep=3) as ckpt:
        ckpt.save(1, model, optimizer)
        model.kernel.set_value(model.kernel[...].at[0, 0].set(jnp.nan))
        ckpt.save(2, model, optimizer)
    restored, got = restore(tmp_path)
    assert restored.step == 1 and np.isfinite(got[-1]).all()


def test_every_step_damaged_is_an_error_naming_the_directory_and_the_fix(three_steps):
    directory, _ = three_steps
    for step in (1, 2, 3):
        overwrite(largest_file(directory / str(step)), 0)
    with pytest.raises(
        training.CheckpointDamaged,
        match=rf"no checkpoint in {re.escape(str(directory))} can be restored \(step 3: .*step 1: .*delete",
    ):
        restore(directory)
    with pytest.raises(training.CheckpointDamaged, match=r"step 2: file"):
        restore(directory, step=2)


def test_a_sweep_resumes_past_damaged_checkpoints_to_the_undisturbed_metrics(tmp_path):
    """The float model's and a QAT cell's latest checkpoints overwritten (256 bytes of 0xFF, the
    case that used to finish ``ok`` at accuracy 0.68): the rerun falls back, retrains the lost steps
    and ends with the undisturbed run's metrics."""
    args = ["sweep.method.name=[qat]", "method.steps=40", "eval.serve=false", "eval.diagnostics=false"]
    undisturbed = records.read_results(
        run.run_sweep(config_lib.load(SMOKE, [f"output_dir={tmp_path / 'a'}", *args]))
    )
    sweep_dir = run.run_sweep(config_lib.load(SMOKE, [f"output_dir={tmp_path / 'b'}", *args]))
    [record] = records.read_results(sweep_dir)
    (sweep_dir / records.RESULTS).unlink()
    (sweep_dir / record["run_dir"] / "metrics.json").unlink()
    float_dir = next(p for p in (tmp_path / "b" / "float-models").glob("seed0-*") if p.is_dir())
    damaged = [float_dir / "42", sweep_dir / record["run_dir"] / "ckpt" / "40"]
    for step_dir in damaged:
        overwrite(largest_file(step_dir), 64)
    run.run_sweep(config_lib.load(SMOKE, [f"output_dir={tmp_path / 'b'}", *args]))
    [again] = records.read_results(sweep_dir)
    assert again["status"] == "ok" and again["metrics"] == undisturbed[0]["metrics"]
    log = (sweep_dir / record["run_dir"] / "log.txt").read_text()
    assert "is damaged" in log and "resuming at step 20 of 40" in log
