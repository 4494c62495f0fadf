"""The example configs end to end: ``qjax-run examples/noise_qat.yaml`` (the console script, from the
repository root: its plug-ins are found in the current directory) and ``examples/blobs.yaml`` (a
user task and a user estimator), each cut to a few steps."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import run
from tests import ROOT

QJAX_RUN = pathlib.Path(sys.executable).with_name("qjax-run")


@pytest.mark.skipif(not QJAX_RUN.is_file(), reason="qjax-run is not installed beside this python")
def test_noise_qat_runs_with_qjax_run(tmp_path):
    cmd = [
        str(QJAX_RUN),
        "examples/noise_qat.yaml",
        f"output_dir={tmp_path}",
        "sweep.quant.weight_estimator=[noise]",
        "train.epochs=1",
        "method.steps=10",
        "eval.limit=200",
    ]
    env = dict(os.environ, CI="true", JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (record,) = records.read_results(tmp_path / "noise_qat")
    assert record["status"] == "ok" and record["cell"] == "quant.weight_estimator=noise"
    assert record["config"]["plugins"] == ["examples.noise_estimator", "examples.dorefa"]
    assert record["config"]["quant"]["weight_estimator"] == "noise"
    m = record["metrics"]
    assert 0.5 < m["accuracy"] <= 1.0
    # evaluated after model.eval(): the noise estimator's value is nearest rounding, as served
    assert m["serve_accuracy"] == pytest.approx(m["accuracy"], abs=0.01)
    saved = json.loads((tmp_path / "noise_qat" / record["run_dir"] / "metrics.json").read_text())
    assert saved["hash"] == record["hash"]


def test_blobs_runs_a_user_task_with_a_user_estimator(tmp_path):
    spec = config_lib.load(
        ROOT / "examples" / "blobs.yaml",
        [f"output_dir={tmp_path}", "train.epochs=2", "method.steps=10", "eval.serve=false"],
    )
    sweep_dir = run.run_sweep(spec)
    recs = {r["cell"]: r for r in records.read_results(sweep_dir)}
    assert set(recs) == {"method.name=ptq", "method.name=qat"}
    for r in recs.values():
        assert r["status"] == "ok", r["error"]
        assert r["metrics"]["accuracy"] > 0.9
        assert r["protocol"]["dataset"].startswith("Gaussian blobs: 512 train / 256 test")
