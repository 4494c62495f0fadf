"""Several ``qjax-run`` processes on one sweep directory (``experiments.sweep.claims``): every cell
runs once, in one process; a float model is trained once and awaited; a killed holder's locks are
released; a cell settled by another process is not run again."""

import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import records
from experiments.sweep import claims
from tests import ROOT
from tests.processes import run_together

HOLDER = """
import pathlib, sys, time
from experiments.sweep import claims
with claims.claim(pathlib.Path(sys.argv[1]), wait=True):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_held_claim_is_refused_and_released_when_its_process_is_killed(tmp_path):
    path = tmp_path / "cells" / "x" / claims.CLAIM
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with claims.claim(path, wait=False) as held:
            assert not held
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        with claims.claim(path, wait=False) as held:
            assert held
            with claims.claim(path, wait=False) as again:  # exclusive within one process too
                assert not again
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_settled_elsewhere():
    ok = {"cell": "c", "hash": "h", "status": "ok"}
    failed = {"cell": "c", "hash": "h", "status": "failed", "error": "boom"}
    assert not claims.settled_elsewhere("h", None, None)
    assert claims.settled_elsewhere("h", None, ok)
    assert claims.settled_elsewhere("h", failed, ok)  # retried and finished by another process
    assert not claims.settled_elsewhere("h", failed, failed)  # the old failure: retry it here
    assert claims.settled_elsewhere("h", None, failed)  # failed in another process meanwhile
    assert not claims.settled_elsewhere("new", ok, ok)  # an old config's record: run the new one


def test_two_processes_on_one_sweep_run_every_cell_once(tmp_path):
    """Each seed's ptq and qat cells need the float model its float cell trains: whichever process
    needs it first trains it, the other waits and restores it."""
    args = [
        str(ROOT / "configs" / "digits" / "smoke.yaml"),
        f"output_dir={tmp_path}",
        "sweep.method.name=[float,ptq,qat]",
        "sweep.seed=[0,1]",
        "method.steps=10",
        "train.epochs=1",
        "eval.serve=false",
        "eval.diagnostics=false",
    ]
    cmd = [sys.executable, "-m", "experiments.sweep.run", *args]
    done = run_together([cmd, cmd], timeout=300, env=dict(os.environ, CI="true"))
    assert [code for code, _ in done] == [0, 0], done
    sweep_dir = tmp_path / "digits_smoke"
    results = records.read_results(sweep_dir)
    assert sorted(r["cell"] for r in results) == sorted(
        f"method.name={m},seed={s}" for m in ("float", "ptq", "qat") for s in (0, 1)
    )
    assert all(r["status"] == "ok" for r in results)
    logs = {p.parent.name: p.read_text() for p in sweep_dir.glob("cells/*/log.txt")}
    assert len(logs) == 6
    for name, log in logs.items():
        assert log.count("INFO qjax.experiments: cell ") == 1, name  # run once, by one process
    for seed in (0, 1):  # each float model trained by one cell; the others restored it
        trained = [n for n, log in logs.items() if f"seed{seed}" in n and "resuming at step" not in log]
        assert len(trained) == 1, (seed, trained)
    assert len({r["protocol"]["device"] for r in results}) == 1


@pytest.mark.parametrize("wait", [False, True])
def test_claim_of_a_free_cell_is_taken_at_once(tmp_path, wait):
    start = time.monotonic()
    with claims.claim(claims.cell_claim_path(tmp_path, "cell"), wait=wait) as held:
        assert held
    assert time.monotonic() - start < 5
