"""Faults in training and evaluation: a diverged run, non-finite metrics, batch sizes the data
cannot fill, and what ``qjax-run`` records and returns for them. Each case asserts the named error
or the failed record, never an ``ok`` record with wrong numbers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import run
from qjax import training
from tests import ROOT

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"


def watched(losses, max_ratio=1e4):
    watch = training.LossWatch(max_ratio)
    for step, loss in enumerate(losses, start=1):
        watch.update(step, jnp.float32(loss))
    return watch


@given(
    st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8),
    st.integers(0, 7),
    st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_the_first_non_finite_loss_is_named(losses, at, bad):
    losses = list(losses)
    watched(losses).check()  # finite and within 1e4 x the first (<= 100 / 0.01): healthy
    at = min(at, len(losses) - 1)
    losses[at] = bad
    losses += [np.nan]  # later bad steps do not hide the first
    with pytest.raises(training.TrainingDiverged, match=rf"diverged at step {at + 1}: loss .* is not finite"):
        watched(losses).check()


def test_a_blown_up_loss_is_named_and_the_ratio_can_be_turned_off():
    with pytest.raises(
        training.TrainingDiverged, match=r"step 3: loss 3e\+04 is over 10000 x the first loss 2"
    ):
        watched([2.0, 5.0, 3e4, 1.0]).check()
    watched([2.0, 5.0, 3e4, 1.0], max_ratio=0).check()
    with pytest.raises(ValueError, match=r"max_ratio=-1.0 must be >= 0"):
        training.LossWatch(-1.0)


def strict(path):
    """Parse ``path`` as strict JSON lines (Python's NaN/Infinity tokens are errors)."""

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverged_cell_fails_with_its_step_and_the_exit_status_says_so(tmp_path, capsys):
    args = [f"output_dir={tmp_path}", "sweep.method.name=[ptq,qat]", "method.learning_rate=1e30"]
    args += ["method.steps=10", "train.epochs=1", "eval.serve=false"]
    assert run.main([str(SMOKE), *args]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 cells failed" in err and "method.name=qat" in err
    by_cell = {r["cell"]: r for r in strict(tmp_path / "digits_smoke" / records.RESULTS)}
    assert by_cell["method.name=ptq"]["status"] == "ok"
    qat = by_cell["method.name=qat"]
    assert qat["status"] == "failed" and "TrainingDiverged: training diverged at step" in qat["error"]
    # nothing diverged was checkpointed: the cell's checkpoints, if any, are finite
    ckpts = list((tmp_path / "digits_smoke" / qat["run_dir"] / "ckpt").glob("[0-9]*"))
    assert not ckpts


def test_records_are_strict_json(tmp_path):
    records.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    records.write_results(tmp_path, [{"cell": "c", "metrics": {"loss": float("-inf")}}])
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None], "c": "x"}
    assert strict(tmp_path / records.RESULTS) == [{"cell": "c", "metrics": {"loss": None}}]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.batch_size=2000"], r"train.batch_size=2000 is larger than the 1348 training examples"),
        (
            ["task.train_limit=10"],
            r"train.batch_size=64 is larger than the 10 training examples .*train_limit=10",
        ),
    ],
)
def test_sizes_the_data_cannot_fill_are_refused_before_compute(tmp_path, overrides, match):
    spec = config_lib.load(SMOKE, [f"output_dir={tmp_path}", *overrides])
    with pytest.raises(config_lib.ConfigError, match=match):
        run.run_sweep(spec)
    assert not (tmp_path / "digits_smoke").exists() or not list((tmp_path / "digits_smoke").glob("cells/*"))
