"""experiments.scripts.bench_qat_step: the two ways of calling the step agree, the rows and the
table, a tiny run end to end (Qwix replaced by the float model, so Qwix need not be installed)."""

import json

import flax.nnx as nnx
import jax
import numpy as np
import pytest

from experiments.scripts import bench_qat_step as bench


@pytest.mark.parametrize("residuals", ["quantized", "original"])
def test_jax_jit_step_trains_like_the_nnx_jit_step(residuals):
    case = {c.key: c for c in bench.CASES}["mlp_small"]
    x = jax.random.normal(jax.random.key(0), (32, 64))
    y = jax.random.randint(jax.random.key(1), (32,), 0, 10)
    model = case.build()
    losses = {}
    for how in bench.STEPS:
        step = bench.make_step(bench.qjax_model(model, None, residuals, weight_bits=4), how)
        losses[how] = [float(step(x, y)) for _ in range(4)]
    np.testing.assert_allclose(losses["jax.jit"], losses["nnx.jit"], rtol=1e-5)
    assert losses["nnx.jit"][-1] < losses["nnx.jit"][0]  # the state is carried from step to step


def test_make_step_names_the_ways():
    with pytest.raises(ValueError, match=r"how='pjit': use one of \('nnx.jit', 'jax.jit'\)"):
        bench.make_step(bench.CASES[1].build(), "pjit")


def test_rows_divide_medians_of_the_same_run():
    case = {c.key: c for c in bench.CASES}["mlp_small"]
    t = {"float": 0.002}
    for i, scheme in enumerate(("W8A8", "W4A8", "W8A8G8")):
        t |= {f"{scheme}/qjax": 0.003 + i, f"{scheme}/qjax_original": 0.0025, f"{scheme}/qwix": 0.001}
    rows = bench.rows_of(case, "jax.jit", t)
    assert [(r["step"], r["scheme"]) for r in rows] == [
        ("jax.jit", "W8A8"),
        ("jax.jit", "W4A8"),
        ("jax.jit", "W8A8G8"),
    ]
    assert rows[0]["float_ms"] == pytest.approx(2.0) and rows[1]["qjax_ms"] == pytest.approx(1003.0)
    assert rows[0]["qjax_over_float"] == pytest.approx(1.5)
    assert rows[0]["qjax_original_over_float"] == pytest.approx(1.25)
    assert rows[1]["qwix_over_float"] == pytest.approx(0.5)
    table = bench.to_markdown(rows).splitlines()
    assert table[0].startswith("| model | step | scheme | float ms |")
    assert table[2] == (
        "| MLP 64-128-128-10, batch 256 | jax.jit | W8A8 | 2.00 | 3.00 | 1.00 | 1.500 | 1.250 | 0.500 |"
    )


def test_a_tiny_run_writes_the_table_and_the_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "qwix_model", lambda model, x, **kw: nnx.clone(model))
    out = tmp_path / "qat_step.json"
    argv = ["--rounds", "1", "--models", "mlp_small", "--steps", "nnx.jit", "jax.jit", "--out", str(out)]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("1 rounds of 5 steps")
    assert len(lines) == 1 + 2 + 6  # the header line, the table's two header rows, 2 steps x 3 schemes
    payload = json.loads(out.read_text())
    assert payload["rounds"] == 1
    rows = payload["results"]
    assert [(r["step"], r["scheme"]) for r in rows] == [
        (how, scheme) for how in ("nnx.jit", "jax.jit") for scheme in ("W8A8", "W4A8", "W8A8G8")
    ]
    for r in rows:
        assert r["qjax_over_float"] == pytest.approx(r["qjax_ms"] / r["float_ms"])
        assert r["qwix_over_float"] > 0
