"""``qjax-run --workers 2`` (``experiments.sweep.parallel``, cells as tasks of a local Ray instance):
the same records as a serial run, float models trained once before the cells that need them, and a
worker killed mid-cell: the task runs again, resumes from the cell's checkpoint, and the sweep ends
with the serial run's metrics."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import parallel, run
from tests import ROOT

pytest.importorskip("ray", reason="the scale extra: pip install -e '.[scale]'")

ARGS = [
    "sweep.method.name=[float,ptq,qat]",
    "sweep.seed=[0,1]",
    "train.epochs=1",
    "method.steps=30",
    "train.checkpoint_every=10",
    "eval.serve=false",
    "eval.diagnostics=false",
]
SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"


def metrics(sweep_dir):
    return {r["cell"]: (r["status"], r["metrics"]) for r in records.read_results(sweep_dir)}


def test_two_workers_match_the_serial_run_and_survive_a_killed_worker(tmp_path):
    serial = run.run_sweep(config_lib.load(SMOKE, [f"output_dir={tmp_path / 'serial'}", *ARGS]))
    expected = metrics(serial)
    assert len(expected) == 6 and all(status == "ok" for status, _ in expected.values())

    out = tmp_path / "parallel"
    cmd = [sys.executable, "-m", "experiments.sweep.run", str(SMOKE), f"output_dir={out}", *ARGS]
    driver = subprocess.Popen(
        [*cmd, "--workers", "2"],
        cwd=ROOT,
        env=dict(os.environ, CI="true"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            for log in (out / "digits_smoke" / "cells").glob("qat_seed*/log.txt"):
                found = re.search(r"in process (\d+)", log.read_text())
                steps = [int(p.name) for p in (log.parent / "ckpt").glob("*") if p.name.isdigit()]
                if found and steps and max(steps) >= 10:  # mid-cell, after a checkpoint
                    os.kill(int(found.group(1)), signal.SIGKILL)
                    killed = log
                    break
            time.sleep(0.05)
        output = driver.communicate(timeout=300)[0]
    finally:
        driver.kill()
        driver.wait()
        driver.stdout.close()
    assert killed is not None, "no QAT cell was seen mid-run"
    assert driver.returncode == 0, output[-4000:]
    assert metrics(out / "digits_smoke") == expected
    log = killed.read_text()
    assert log.count("INFO qjax.experiments: cell ") == 2 and "resuming at step" in log  # run again
    float_logs = sorted((out / "float-models").glob("*.log"))
    assert len(float_logs) == 2  # one float task per seed, before the cells
    cells = {p.parent.name: p.read_text() for p in (out / "digits_smoke" / "cells").glob("*/log.txt")}
    assert all("resuming at step" in text for text in cells.values())  # float models came first


def test_ray_address_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert parallel.ray_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert parallel.ray_address(None) == "10.0.0.1:6379"
    assert parallel.ray_address("auto") == "auto"


def test_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        run.main([str(SMOKE), "--workers", "0"])
    assert "--workers 0: give at least 1" in capsys.readouterr().err
