"""kill -9 at random points: a ``qjax-run`` process killed at a random moment (seeded) of its cell's
work, wherever it is (training the float model, QAT, saving a checkpoint, calibrating, writing
records), twice, then run to the end: the records equal an undisturbed run's, and no checkpoint or
results file is left half-written."""

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
    killed = []
    for delay in rng.uniform(0.0, 2.5, size=2):  # seconds into the cell's work
        logs_before = {p: p.stat().st_size for p in out.glob("*/cells/*/log.txt")}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:  # until this run's cell starts
                logs = {p: p.stat().st_size for p in out.glob("*/cells/*/log.txt")}
                if logs != logs_before:
                    break
                time.sleep(0.05)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed.append(round(float(delay), 2))
        finally:
            proc.kill()
            proc.wait()
    assert len(killed) == 2, killed  # both landed while the cell ran
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(out / "digits_smoke") == expected
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or "orbax-checkpoint-tmp" in p.name]
    assert not leftovers, leftovers
