"""kill -9 at random points: a ``qjax-run`` process killed at random moments (seeded), wherever it
is (training, saving a checkpoint, calibrating, writing records), then run to the end: the records
equal an undisturbed run's, and no checkpoint or results file is left half-written."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import run
from tests import ROOT

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"
ARGS = [
    "train.epochs=2",
    "method.steps=60",
    "train.checkpoint_every=5",
    "eval.serve=false",
    "eval.diagnostics=false",
]


def metrics(sweep_dir):
    return {r["cell"]: (r["status"], r["metrics"]) for r in records.read_results(sweep_dir)}


def test_random_kills_resume_to_the_undisturbed_records(tmp_path):
    expected = metrics(run.run_sweep(config_lib.load(SMOKE, [f"output_dir={tmp_path / 'calm'}", *ARGS])))
    out = tmp_path / "chaos"
    cmd = [sys.executable, "-m", "experiments.sweep.run", str(SMOKE), f"output_dir={out}", *ARGS]
    env = dict(os.environ, CI="true")
    rng = np.random.default_rng(20261207)
    killed = 0
    for delay in rng.uniform(3.5, 7.0, size=2):  # a process needs ~3 s to import and validate
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
        finally:
            proc.kill()
            proc.wait()
    assert killed == 2  # the run takes longer than the delays: the kills land mid-run
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(out / "digits_smoke") == expected
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or "orbax-checkpoint-tmp" in p.name]
    assert not leftovers, leftovers
