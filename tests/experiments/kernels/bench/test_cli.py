"""``python -m experiments.kernels.bench`` (experiments.kernels.bench.cli): a CPU smoke run, the time
budget, the interpreter, the device clock with a stand-in profiler, bad arguments."""

from __future__ import annotations

import json

import jax
import pytest

from experiments.kernels import timing
from experiments.kernels.bench.accounting import activation_bytes, nominal_weight_bytes
from experiments.kernels.bench.cli import main, make_config, parse_args, parse_kernels, parse_shapes
from experiments.kernels.bench.data import make_weights, tree_nbytes
from experiments.kernels.bench.rows import HOPPER_KERNELS, KERNELS, MAX_M, QUICK_CPU, XLA_KERNELS


def test_quick_cpu_smoke_run(tmp_path, capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("the smoke run checks the CPU reference path")
    out = tmp_path / "results.json"
    assert main(["--quick", "--repeats", "3", "--out", str(out), "--md", str(tmp_path / "r.md")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md", "results.json"]  # no temp files left
    result = json.loads(out.read_text())
    assert result["meta"]["backend"] == "reference" and result["stopped"] is None
    cells = {(c["kernel"], c["shape"], c["m"]): c for c in result["cells"]}
    run = [k for k in KERNELS if k not in HOPPER_KERNELS]  # Mosaic GPU rows: gpu backend only
    assert result["meta"]["skipped_kernels"] == [
        f"{k} (Mosaic GPU: runs with backend gpu only)" for k in HOPPER_KERNELS
    ]
    wanted = {(k, s, m) for k in run for s in QUICK_CPU.shapes for m in QUICK_CPU.m if m <= MAX_M.get(k, m)}
    assert ("w8a8-split1", "tiny.a", 16) in wanted and ("w8a8-split1", "tiny.a", 64) not in wanted
    assert set(cells) == wanted
    for cell in cells.values():
        assert "error" not in cell, cell
        assert cell["time_s"] > 0 and cell["gbps"] > 0 and cell["speedup"] > 0
        assert cell["roofline_pct"] is None  # CPU: no peaks
    xla_rows = [c for c in cells.values() if c["kernel"] in XLA_KERNELS]  # XLA's int8 / fp8 dot
    assert len(xla_rows) == 2 * len(QUICK_CPU.shapes) * len(QUICK_CPU.m)
    assert all(c["speedup"] > 0 for c in xla_rows)
    assert "the -xla rows: XLA's native int8 / fp8 dot" in result["meta"]["backend_note"]
    assert {(r["kernel"], r["shape"]) for r in result["crossover"]} == {
        (k, s) for k in run[1:] for s in QUICK_CPU.shapes
    }
    printed = capsys.readouterr().out
    assert "reference" in printed.splitlines()[0] and "NOT the Pallas kernels" in printed.splitlines()[0]
    assert printed.rstrip().splitlines()[-1].startswith("fp8")  # the compact table comes last
    assert "| crossover M |" in (tmp_path / "r.md").read_text()


def test_time_budget_stops_cleanly(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--quick", "--time-budget-s", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cells"] == [] and "time budget" in result["stopped"]
    assert (tmp_path / "r.md").exists()
    assert "stopped: time budget" in capsys.readouterr().out


def test_interpret_runs_the_pallas_kernels(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--interpret", "--kernels", "w8a8", "--shapes", "tiny.a", "--m", "16", "--repeats", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert [(c["kernel"], c["m"]) for c in cells] == [("bf16", 16), ("w8a8", 16)]
    assert all("error" not in c and c["time_s"] > 0 for c in cells)


def test_device_clock_sweep_records_cupti_kernels(tmp_path, monkeypatch, capsys):
    """The sweep on the device clock, with a stand-in for jax's CUPTI profiler: each program's time is
    the sum of its recorded kernels over R, and the cells list the kernels."""
    programs_timed = []

    def measure(f, *, aggregate, iterations):
        def wrapper(*args):
            programs_timed.append(len(args) - 1)  # R weight copies follow x
            copies = len(args) - 1
            its = [[("matmul", 0.010)] * copies + [("reduce", 0.004)] for _ in range(iterations)]
            return f(*args), its

        return wrapper

    monkeypatch.setattr(timing, "cupti_measure", lambda: measure)
    monkeypatch.setattr(timing, "device_clock_problem", lambda platform, m=None: None)
    out = tmp_path / "r.json"
    argv = ["--quick", "--kernels", "w8a8", "--shapes", "tiny.a", "--m", "1,16", "--clock", "device"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["clock"] == "device" and "CUPTI" in result["meta"]["method"]
    assert len(result["cells"]) == 4 and programs_timed == [2] * 4
    for cell in result["cells"]:
        assert cell["clock"] == "device" and cell["copies"] == 2
        assert cell["time_s"] == pytest.approx((2 * 10 + 4) * 1e-6 / 2)
        assert cell["device_kernels"][0] == {"name": "matmul", "launches": 2, "us": pytest.approx(20.0)}
    assert "longest: matmul x2 83% of 2 kernels" in capsys.readouterr().out
    md = out.with_suffix(".md").read_text()
    assert "| w8a8 | tiny.a | 16 | 2 | `matmul` x2: 20.0; `reduce` x1: 4.0 |" in md


def test_bad_arguments():
    if jax.default_backend() != "gpu":
        with pytest.raises(SystemExit, match=r"--clock device: the device clock \(CUPTI\) needs a GPU"):
            make_config(parse_args(["--clock", "device"]))
    with pytest.raises(SystemExit, match="unknown"):
        parse_shapes("7b.qkv,nope")
    with pytest.raises(SystemExit, match="unknown"):
        parse_kernels("w8a8,int3")
    assert parse_shapes("llama2-7b,7b.o,128x256")[-1] == ("128x256", 128, 256)
    assert len(parse_shapes("all")) == 8
    assert parse_kernels("fp8") == ("bf16", "fp8")
    assert nominal_weight_bytes("w8a8-mgpu", 64, 32) == nominal_weight_bytes("w8a8", 64, 32)
    assert activation_bytes("fp8-mgpu", 4, 64) == activation_bytes("fp8", 4, 64)
    assert activation_bytes("w4a16-mgpu", 4, 64) == activation_bytes("w4a16", 4, 64)
    w4h = make_weights("w4-hopper", jax.random.key(0), 256, 128)
    assert tree_nbytes(w4h) == 128 * 1024 // 2 + 8 * 128 * 4  # int4 codes counted at 4 bits
