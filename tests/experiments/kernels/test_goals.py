"""``experiments.kernels.goals``: the speed goals judged on results files, one or several of one device
pooled (the Mosaic GPU rows are measured in a process of their own)."""

from __future__ import annotations

import json
import pathlib

import pytest

from experiments.kernels import goals as bg
from tests import ROOT

H100_RUN1 = ROOT / "docs/benchmarks/kernels_h100/run1_bench.json"


def _write(path: pathlib.Path, speedups: dict[str, dict[int, float]], **meta: object) -> pathlib.Path:
    """A results file with the given speedups on shape ``s`` (the bf16 baseline at 1x)."""
    cells = [{"kernel": "bf16", "shape": "s", "m": m, "speedup": 1.0} for m in (1, 16, 1024, 4096)]
    cells += [
        {"kernel": kernel, "shape": "s", "m": m, "speedup": v}
        for kernel, by_m in speedups.items()
        for m, v in by_m.items()
    ]
    data = {"meta": {"backend": "gpu", "device_kind": "H", "shapes": {"s": [64, 64]}, **meta}, "cells": cells}
    path.write_text(json.dumps(data))
    return path


def test_files_of_one_device_are_pooled(tmp_path, capsys):
    """The Hopper rows of a second file count beside the first file's rows, each at its own speedup."""
    triton = _write(
        tmp_path / "bench.json", {"w8a8": {1024: 1.2, 4096: 1.3}, "w8a8-xla": {1024: 1.4, 4096: 1.6}}
    )
    mgpu = _write(tmp_path / "bench_mgpu.json", {"w8a8-mgpu": {1024: 1.7, 4096: 1.1}, "w4a16-mgpu": {1: 3.5}})
    pooled = bg.pool([triton, mgpu])
    assert pooled.device == "H" and pooled.shapes == ("s",) and len(pooled.cells) == (4 + 4) + (4 + 3)
    rows = {r["goal"].split()[0]: r for r in bg.judge("gpu", pooled.shapes, pooled.cells)}
    assert set(rows) == {"W8A8", "W4A16"}
    w8 = rows["W8A8"]
    assert {m: b["kernel"] for m, b in w8["pallas"]["best"].items()} == {1024: "w8a8-mgpu", 4096: "w8a8"}
    assert w8["pallas"]["worst"] == 1.3 and w8["pallas"]["worst_m"] == 4096 and not w8["met"]
    assert w8["with_xla"]["worst"] == 1.6 and w8["met_with_xla"]  # 1.7 (mgpu) at 1024, 1.6 (xla) at 4096
    w4 = rows["W4A16"]  # M = 1 only was measured: judged on it, no XLA column
    assert w4["met"] and w4["pallas"]["worst_m"] == 1 and w4["with_xla"] is None

    md, js = tmp_path / "goals.md", tmp_path / "goals.json"
    assert bg.main([str(triton), str(mgpu), "--md", str(md), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "H: 15 cells from 2 file(s)" in out
    assert "W8A8 at M >= 1024 >= 1.5x bf16, s: Pallas 1.30x at M=4096 NOT met" in out
    assert "with XLA's dot 1.60x met" in out
    page = md.read_text()
    assert page.startswith("# Kernel goals: H\n") and f"`{mgpu}`" in page
    assert "| W4A16 at M <= 16 >= 3x bf16 | s | M=1: w4a16-mgpu 3.50x | 3.50x | yes | - | - |" in page
    saved = json.loads(js.read_text())
    assert saved["files"] == [str(triton), str(mgpu)]
    assert saved["goals"][1]["pallas"]["best"]["1024"]["kernel"] == "w8a8-mgpu"


def test_no_goal_cell(tmp_path, capsys):
    only_mid = _write(tmp_path / "r.json", {"w8a8": {64: 0.5}})
    assert bg.main([str(only_mid), "--md", str(tmp_path / "g.md")]) == 0
    assert "no cell of these files falls in a goal's M range" in capsys.readouterr().out
    assert "No cell of these files" in (tmp_path / "g.md").read_text()


def test_skip_missing(tmp_path, capsys):
    """A benchmark cut before its first shape wrote no file: the other is judged alone."""
    present = _write(tmp_path / "bench.json", {"fp8": {1024: 1.6, 4096: 1.5}})
    absent = tmp_path / "bench_mgpu.json"
    with pytest.raises(SystemExit, match=r"cannot read .*bench_mgpu\.json"):
        bg.main([str(present), str(absent)])
    assert bg.main([str(present), str(absent), "--skip-missing", "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert f"skipped (missing): {absent}" in out and "FP8 at M >= 1024 >= 1.5x bf16, s: Pallas 1.50x" in out
    assert json.loads((tmp_path / "g.json").read_text())["files"] == [str(present)]
    with pytest.raises(SystemExit, match="none of the results files exists"):
        bg.main([str(absent), "--skip-missing"])


def test_refusals_name_the_file_and_the_fix(tmp_path):
    good = _write(tmp_path / "a.json", {"w8a8": {1024: 1.0}})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"cannot read .*bad\.json as JSON .*pass the --out file"):
        bg.pool([good, tmp_path / "bad.json"])
    with pytest.raises(SystemExit, match=r"cannot read .*missing\.json"):
        bg.pool([tmp_path / "missing.json"])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"list\.json is not a bench_kernels results file"):
        bg.pool([tmp_path / "list.json"])
    cpu = _write(tmp_path / "cpu.json", {"w8a8": {1024: 1.0}}, backend="reference")
    with pytest.raises(
        SystemExit, match=r"cpu\.json was measured with backend 'reference'; the goals are GPU"
    ):
        bg.pool([cpu])
    other = _write(tmp_path / "other.json", {"fp8": {1024: 1.0}}, device_kind="G")
    with pytest.raises(SystemExit, match=r"measured on H and .*other\.json on G; judge one device's files"):
        bg.pool([good, other])
    again = _write(tmp_path / "again.json", {"w8a8": {1024: 2.0}})
    with pytest.raises(SystemExit, match=r"w8a8 on s at M=1024 is in both .*a\.json and .*again\.json"):
        bg.pool([good, again])
    with pytest.raises(SystemExit, match="no results file given"):
        bg.pool([])


def test_on_the_h100_run():
    """The committed H100 run 1: each goal's worst speedup is the minimum over the goal's M range of
    the best row's speedups read from the cells (one Pallas row per goal was measured then)."""
    pooled = bg.pool([H100_RUN1])
    assert pooled.device == "NVIDIA H100 80GB HBM3"
    rows = bg.judge("gpu", pooled.shapes, pooled.cells)
    assert len(rows) == 3 * 4  # three goals on four shapes
    for r in rows:
        goal = next(g for g in bg.GOALS if g.label() == r["goal"])
        speedups = [
            c["speedup"]
            for c in pooled.cells
            if c["shape"] == r["shape"] and c["kernel"] in goal.rows and goal.covers(c["m"])
        ]
        assert len(speedups) == 2 and r["pallas"]["worst"] == min(speedups)
        assert r["met"] is (min(speedups) >= goal.target) and r["with_xla"] is None
    assert not any(r["met"] for r in rows)
