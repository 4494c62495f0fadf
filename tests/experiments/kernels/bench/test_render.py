"""experiments.kernels.bench.render (with the sweep's speedups, crossovers and goals): the compact
table, the markdown and the JSON goals from synthetic timings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experiments.kernels.bench.accounting import add_speedups
from experiments.kernels.bench.render import compact_table, goals_text, markdown, payload
from experiments.kernels.bench.sweep import Config, Sweep, crossovers, goal_rows


def test_speedups_and_crossovers_from_synthetic_timings():
    ms = (1, 16, 256)
    config = Config(("bf16", "w4a16", "fp8"), (("s", 64, 64),), ms, 1, "reference", 2, None)
    sweep = Sweep(config, {}, None)
    times = {"bf16": (10.0, 12.0, 20.0), "w4a16": (4.0, 6.0, 25.0), "fp8": (5.0, 6.0, 10.0)}
    sweep.cells = [
        {"kernel": kern, "shape": "s", "m": m, "time_s": t}
        for kern, ts in times.items()
        for m, t in zip(ms, ts, strict=True)
    ]
    add_speedups(sweep.cells)
    rows = {r["kernel"]: r for r in crossovers(sweep)}
    assert rows["w4a16"]["speedups"] == {1: 2.5, 16: 2.0, 256: 0.8}
    assert rows["w4a16"]["crossover"] == 256
    assert rows["fp8"]["crossover"] == "none"
    assert "bf16" not in rows
    table = compact_table(sweep)
    assert "2.50x" in table and table.splitlines()[-1].endswith("none")


def test_goals_from_synthetic_timings():
    """The best row at each M, the worst of those against the target, Pallas rows apart from XLA's
    dot; GPU sweeps only."""
    ms = (1, 16, 1024, 4096)
    kernels = ("bf16", "w4a16", "w4a16-swap", "w8a8", "w8a8-nk", "w8a8-xla")
    config = Config(kernels, (("s", 64, 64),), ms, 1, "gpu", 2, None)
    sweep = Sweep(config, {}, None)
    times = {  # us per call; bf16 / t = speedup
        "bf16": (30.0, 30.0, 100.0, 400.0),
        "w4a16": (10.0, 12.0, 400.0, 1600.0),  # 3.0x, 2.5x
        "w4a16-swap": (12.0, 9.0, 400.0, 1600.0),  # 2.5x, 3.33x
        "w8a8": (20.0, 20.0, 80.0, 400.0),  # at M >= 1024: 1.25x, 1.0x
        "w8a8-nk": (20.0, 20.0, 50.0, 320.0),  # 2.0x, 1.25x
        "w8a8-xla": (20.0, 20.0, 60.0, 200.0),  # 1.67x, 2.0x
    }
    sweep.cells = [
        {"kernel": kern, "shape": "s", "m": m, "time_s": 1e-6 * t, **_FILLER}
        for kern, ts in times.items()
        for m, t in zip(ms, ts, strict=True)
    ]
    add_speedups(sweep.cells)
    rows = {r["goal"].split()[0]: r for r in goal_rows(sweep)}
    assert set(rows) == {"W4A16", "W8A8"}  # no FP8 cells measured
    w4 = rows["W4A16"]
    assert w4["goal"] == "W4A16 at M <= 16 >= 3x bf16"
    assert {m: b["kernel"] for m, b in w4["pallas"]["best"].items()} == {1: "w4a16", 16: "w4a16-swap"}
    assert w4["pallas"]["worst"] == pytest.approx(3.0) and w4["pallas"]["worst_m"] == 1 and w4["met"]
    assert w4["with_xla"] is None and w4["met_with_xla"] is None
    w8 = rows["W8A8"]
    assert w8["goal"] == "W8A8 at M >= 1024 >= 1.5x bf16"
    assert w8["pallas"]["worst"] == pytest.approx(1.25) and w8["pallas"]["worst_m"] == 4096 and not w8["met"]
    best = {m: b["kernel"] for m, b in w8["with_xla"]["best"].items()}
    assert best == {1024: "w8a8-nk", 4096: "w8a8-xla"}  # 2.0x at both
    assert w8["with_xla"]["worst"] == pytest.approx(2.0) and w8["met_with_xla"]
    text = goals_text(sweep)
    assert "W8A8 at M >= 1024 >= 1.5x bf16, s: Pallas 1.25x at M=4096 NOT met" in text
    assert "with XLA's dot 2.00x met" in text
    md = markdown(dataclasses.replace(sweep, meta=_META))
    w4_row = (
        "| W4A16 at M <= 16 >= 3x bf16 | s | M=1: w4a16 3.00x; M=16: w4a16-swap 3.33x | 3.00x | yes | - | - |"
    )
    assert w4_row in md
    goals = json.loads(json.dumps(payload(sweep)["goals"]))
    assert goals[1]["with_xla"]["best"]["4096"]["kernel"] == "w8a8-xla"
    reference = dataclasses.replace(sweep, config=dataclasses.replace(config, backend="reference"))
    assert goal_rows(reference) == [] and goals_text(reference) == ""


_FILLER = {"k": 64, "n": 64, "tflops": 1.0, "gbps": 1.0, "roofline_pct": None, "copies": 2}  # markdown


_META = {
    "device_kind": "test",
    "platform": "gpu",
    "backend": "gpu",
    "jax_version": "0",
    "method": "synthetic",
}
