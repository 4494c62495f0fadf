"""``scripts/device_kernels.sh``, the one run a lent GPU gets: every experiment it starts accepts its
arguments (a typo found on the device costs device time), and its step limits fit the budget it
states."""

from __future__ import annotations

import re
import shlex

import numpy as np

from experiments.kernels import profile_w4a16 as pw
from experiments.kernels import tune as tb
from experiments.kernels.bench import cli, rows
from tests import ROOT

SCRIPT = ROOT / "scripts" / "device_kernels.sh"


def _steps() -> list[tuple[int, str, list[str]]]:
    """``(timeout seconds, module, arguments)`` of every ``timeout N "$py" -m experiments.X ...``."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        found = re.match(r'\s*timeout (\d+) "\$py" -m (experiments[.\w]+) (.*)', line)
        if found:
            words = shlex.split(found.group(3).split("|")[0].split("2>&1")[0])
            steps.append((int(found.group(1)), found.group(2), words))
    return steps


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_the_script_runs_its_steps_within_its_stated_limit():
    steps = _steps()
    assert [module for _, module, _ in steps] == [
        "experiments.kernels.check",
        "experiments.kernels.bench",
        "experiments.kernels.bench",  # the Mosaic GPU rows in a process of their own
        "experiments.kernels.tune",
        "experiments.kernels.profile_w4a16",
        "experiments.kernels.goals",  # the goals over both benchmark files
    ]
    total = sum(limit for limit, _, _ in steps)
    stated = re.search(r"time limit \(([\d + ]+) s", SCRIPT.read_text())
    assert stated is not None and sum(map(int, stated.group(1).split("+"))) == total
    assert total <= 530  # leaves a 15-minute device budget room for the start and a partial rerun
    assert re.search(rf"at most {total} s", SCRIPT.read_text())
    for limit, _, args in steps:  # the experiments' own budgets end before the hard limit
        budget = _value(args, "--time-budget-s")
        assert budget is None or float(budget) < limit


def test_check_arguments_parse(tmp_path, monkeypatch):
    """The device check's arguments, run on no cases (its cases are checked in test_check_kernels)."""
    from experiments.kernels import check as ck

    (args,) = [a for _, m, a in _steps() if m == "experiments.kernels.check"]
    monkeypatch.setattr(ck, "planned_runs", lambda backend: [])
    out = tmp_path / "check.json"
    assert ck.main(["--backend", "interpret", *[a if "$out" not in a else str(out) for a in args]]) == 0
    assert out.exists()


def test_benchmark_and_profile_arguments_parse():
    benches = [cli.parse_args(a) for _, m, a in _steps() if m == "experiments.kernels.bench"]
    for parsed in benches:
        assert len(cli.parse_kernels(parsed.kernels)) > 1
        assert [s for s, _, _ in cli.parse_shapes(parsed.shapes)] == parsed.shapes.split(",")
    # the Mosaic GPU rows in the second process only (a crash there cannot cost the first its cells)
    first, second = (set(cli.parse_kernels(p.kernels)) for p in benches)
    assert not first & set(rows.HOPPER_KERNELS) and set(rows.HOPPER_KERNELS) <= second
    assert set(rows.XLA_KERNELS) <= first and {p.out.name for p in benches} == {
        "bench.json",
        "bench_mgpu.json",
    }
    (args,) = [a for _, m, a in _steps() if m == "experiments.kernels.profile_w4a16"]
    parsed = pw.make_parser().parse_args(args)
    assert all(s in rows.SHAPES for s in parsed.shapes.split(","))
    assert all(int(m) >= 1 for m in parsed.m.split(","))


def test_tuning_kernels_exist():
    (args,) = [a for _, m, a in _steps() if m == "experiments.kernels.tune"]
    kernels = tb.make_parser().parse_args(args).kernels.split(",")
    known = {"w8a8", "fp8", "w4a16", "w8a8-nk", "fp8-nk", "bf16", *tb.MOSAIC_GPU, *tb.XLA_DOTS}
    assert kernels and set(kernels) <= known
    assert set(tb.XLA_DOTS) <= set(kernels)  # XLA's int8 / fp8 dot beside the Pallas kernels


def test_tune_blocks_times_xla_dots_in_both_layouts(capsys):
    """``w8a8-xla`` / ``fp8-xla``: XLA's dot with the weight stored (K, N) and (N, K), the same values."""
    argv = ["--kernels", "w8a8-xla,fp8-xla", "--m", "16", "--k", "256", "--n", "256", "--clock", "wall"]
    assert tb.main(argv) == 0
    printed = capsys.readouterr().out
    for kernel in tb.XLA_DOTS:
        lines = [line for line in printed.splitlines() if line.lstrip().startswith(f"{kernel} M=16 ")]
        assert sorted(line.split("TF/s ")[1] for line in lines) == ["XLA (K, N)", "XLA (N, K)"]
        assert f"BEST {kernel} M=16: XLA (" in printed
        (x, ws), call = tb.operands(kernel, 16, 256, 128, np.random.default_rng(1))
        y_kn, y_nk = (np.asarray(call(x, ws[0], layout), np.float32) for layout in tb.XLA_LAYOUTS)
        assert y_kn.shape == y_nk.shape == (16, 128)
        np.testing.assert_allclose(y_nk, y_kn, rtol=0, atol=1e-2 * np.abs(y_kn).max())  # bf16 outputs


def test_goals_are_judged_on_both_benchmark_files():
    benches = [cli.parse_args(a) for _, m, a in _steps() if m == "experiments.kernels.bench"]
    (args,) = [a for _, m, a in _steps() if m == "experiments.kernels.goals"]
    files = [a for a in args if not a.startswith("--") and a.endswith(".json") and "goals" not in a]
    assert files == [f"$out/{p.out.name}" for p in benches]
