"""One cell over two processes (``experiments.sweep.hosts``): ``qjax-run`` twice on localhost, 2
simulated CPU devices each, joined by ``jax.distributed`` (gloo collectives), on a ``2 x 2`` mesh.

The two processes give the records of one process with 4 devices, bit for bit (the same program
over the same mesh). One of them is killed mid-QAT: the other stops by itself (jax's coordination
service, ``--heartbeat-timeout``), no record is written, and the same command rerun in both resumes
the cell from its last checkpoint and ends with the uninterrupted run's records."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import hosts, run
from tests import ROOT
from tests.processes import run_together

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"
ARGS = [
    "sweep.method.name=[qat]",
    "train.epochs=1",
    "method.steps=50",
    "train.checkpoint_every=10",
    "eval.export=true",
    "mesh.data=2",
    "mesh.fsdp=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(out, name, process_id=None, port=None):
    cmd = [
        sys.executable,
        "-m",
        "experiments.sweep.run",
        str(SMOKE),
        f"output_dir={out}",
        f"name={name}",
        *ARGS,
    ]
    if process_id is not None:
        cmd += ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(process_id)]
        cmd += ["--heartbeat-timeout", "30"]  # loaded CI cores must not look like a dead process
    return cmd


def env_with(devices):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return dict(env, CI="true", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def comparable(sweep_dir):
    """What two runs of the same cells must share exactly: status, metrics (but the bytes of the
    exported checkpoint: orbax writes each process's part and its own metadata) and the model's
    accounting. The per-layer diagnostics are compared apart."""
    return {
        r["cell"]: (r["status"], {k: v for k, v in r["metrics"].items() if k != "export_bytes"}, r["model"])
        for r in records.read_results(sweep_dir)
    }


def test_two_processes_match_one_and_resume_after_one_is_killed(tmp_path):
    out = tmp_path / "out"
    # one process, 4 devices: the reference (and the float model, shared by the other sweep)
    [(rc, log)] = run_together([command(out, "one")], timeout=300, env=env_with(4))
    assert rc == 0, log[-4000:]
    expected = comparable(out / "one")
    assert [s for s, *_ in expected.values()] == ["ok"]

    two = out / "two"
    port = free_port()
    procs = [
        subprocess.Popen(
            command(out, "two", i, port),
            cwd=ROOT,
            env=env_with(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 240
        ckpt = None
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            steps = [int(p.name) for p in two.glob("cells/qat-*/ckpt/*") if p.name.isdigit()]
            if steps and max(steps) >= 20:
                ckpt = max(steps)
                break
            time.sleep(0.2)
        assert ckpt is not None and ckpt < 50, [p.communicate(timeout=30)[0][-3000:] for p in procs]
        procs[1].send_signal(signal.SIGKILL)
        # the survivor stops by itself: its next collective fails (gloo sees the peer gone) and it
        # says which cell failed; or jax's coordination service misses process 1's heartbeats
        survivor, _ = procs[0].communicate(timeout=120)
        assert procs[0].returncode != 0, survivor[-3000:]
        ours = "qjax-run: cell method.name=qat failed in process 0 of 2" in survivor
        assert ours or "another task died" in survivor, survivor[-3000:]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert not (two / records.RESULTS).exists() or not records.read_results(two)

    port = free_port()
    done = run_together([command(out, "two", i, port) for i in range(2)], timeout=300, env=env_with(2))
    for rc, log in done:
        assert rc == 0, log[-4000:]
    assert "qjax-report" in done[0][1] and "qjax-report" not in done[1][1]  # process 0 prints the report
    assert comparable(two) == expected
    [record] = records.read_results(two)
    # diagnostics run on the model whole on every device (each process reads it), the reference's
    # on the 2 x 2 layout: sums in another order
    [reference] = records.read_results(out / "one")
    assert len(record["layers"]) == len(reference["layers"]) == 3
    for mine, theirs in zip(record["layers"], reference["layers"], strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key] == (
                pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value
            )
    assert record["protocol"]["mesh"]["processes"] == 2 and record["protocol"]["device"] == "cpu: cpu x4"
    assert record["metrics"]["export_accuracy"] == record["metrics"]["accuracy"]
    log = (two / record["run_dir"] / "log.txt").read_text()
    assert re.search(r"resuming at step (\d+) of 50", log), log


def test_flags_go_together_and_exclude_ray(capsys):
    with pytest.raises(SystemExit):
        run.main([str(SMOKE), "--coordinator", "localhost:1234"])
    assert "--coordinator, --num-processes and --process-id go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main([str(SMOKE), "--distributed", "--workers", "2"])
    assert "leave them out" in capsys.readouterr().err


def test_one_process_agrees_with_itself():
    assert not hosts.several() and hosts.agree(7) == 7 and jax.process_count() == 1


def test_a_mesh_short_of_the_devices_is_named_before_compute(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda: 4)  # 2 processes x 2 devices
    with pytest.raises(
        config_lib.ConfigError, match=r"uses 1 of the 4 devices of 2 processes.*set mesh.data=-1"
    ):
        config_lib.load(SMOKE, ["mesh.data=1"]).cells()
