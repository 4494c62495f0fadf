"""``experiments.kernels.check``: every case runs and passes in the Pallas interpreter, results are
written as JSON, a failing case makes the run fail, and a GPU run plans the Hopper and W4A16 cases."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from experiments.kernels import check as ck


def test_interpret_run_passes_and_writes(tmp_path, capsys):
    out = tmp_path / "check.json"
    # one shape with odd M, K and N (padded blocks, masked rows): each kernel's own tests cover more
    assert ck.main(["--backend", "interpret", "--shapes", "3x200x130", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(ck.CASES) and all(r["ok"] for r in results)
    assert f"{len(results)}/{len(results)} cases OK" in capsys.readouterr().out


def test_a_failing_case_fails_the_run(tmp_path, monkeypatch):
    def wrong(rng, m, k, n, backend):
        return 1.0, 0.0  # error above tolerance

    def broken(rng, m, k, n, backend):
        raise RuntimeError("does not compile")

    monkeypatch.setattr(ck, "CASES", {"wrong": wrong, "broken": broken})
    out = tmp_path / "check.json"
    assert ck.main(["--backend", "interpret", "--shapes", "1x64x64", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["results"]
    assert [r["ok"] for r in rows] == [False, False]
    assert "does not compile" in rows[1]["exception"]


def test_gpu_runs_add_the_hopper_and_w4a16_options():
    names = [(name, backend) for name, _, backend in ck.planned_runs("gpu")]
    assert ("int8_matmul (int32 exact) [mosaic_gpu]", "mosaic_gpu") in names
    assert ("w4a16_matmul (asym) [unpack=asm]", "gpu") in names
    assert ("w4a16_matmul_hopper (asym) [mosaic_gpu]", "gpu") in names
    assert len(ck.planned_runs("interpret")) == len(ck.CASES)


def test_hopper_w4_case_runs_in_the_interpreter(monkeypatch):
    """The Hopper W4A16 case (group 64 where 128 does not divide K) against its reference, in the GPU
    interpreter of jax >= 0.11 (weight staged through shared memory)."""
    from qjax.kernels.experimental import hopper, hopper_w4

    real = hopper_w4.w4a16_matmul_hopper
    monkeypatch.setattr(hopper_w4, "w4a16_matmul_hopper", lambda *a, **kw: real(*a, interpret=True, **kw))
    case = ck.W4A16_GPU_CASES["w4a16_matmul_hopper (asym) [mosaic_gpu]"]
    if not hopper.INTERPRETS_8BIT:  # jax 0.10's interpreter cannot run it and says so
        with pytest.raises(NotImplementedError, match=r"use jax >= 0\.11"):
            case(np.random.default_rng(0), 1, 256, 128, "gpu")
        return
    for m, k, n in [(1, 256, 128), (33, 200, 130)]:
        err, tol = case(np.random.default_rng(0), m, k, n, "gpu")
        assert err <= tol, (m, k, n, err)


def test_time_budget_stops_cleanly_and_keeps_what_ran(tmp_path, monkeypatch, capsys):
    def slow(rng, m, k, n, backend):
        time.sleep(0.2)
        return 0.0, 0.0

    monkeypatch.setattr(ck, "CASES", {"slow": slow, "never": slow})
    out = tmp_path / "check.json"
    argv = ["--backend", "interpret", "--shapes", "1x64x64", "--time-budget-s", "0.1", "--out", str(out)]
    assert ck.main(argv) == 0
    data = json.loads(out.read_text())
    assert [r["case"] for r in data["results"]] == ["slow"]
    assert data["stopped"] == "time budget of 0.1 s reached before never M=1 K=64 N=64"
    assert "1/1 cases OK (stopped early)" in capsys.readouterr().out
