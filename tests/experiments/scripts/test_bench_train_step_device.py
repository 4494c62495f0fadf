"""experiments.scripts.bench_train_step_device: a tiny run end to end on the CPU (the table, the
JSON, what each variant contracts), the bf16 parameters, and the argument checks."""

import json
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.scripts import bench_train_step_device as bench
from tests import ROOT

# flax's LayerNorm computes its statistics of a bf16 input in f32 (standard promotion)
pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_the_model_is_bf16_throughout():
    model = bench.build(32, 4, 1)
    dtypes = {a.dtype for a in jax.tree.leaves(bench.nnx.state(model, bench.nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert model(jnp.ones((1, 4, 32), jnp.bfloat16)).dtype == jnp.bfloat16


def test_a_tiny_run_writes_the_table_and_the_json(tmp_path, capsys):
    out, md = tmp_path / "step.json", tmp_path / "step.md"
    argv = ["--d", "32", "--heads", "4", "--layers", "1", "--batch", "2", "--tokens", "8", "--rounds", "3"]
    argv += ["--time-budget-s", "0", "--variants", "bf16", "int8 full", "fp8 current"]
    assert bench.main([*argv, "--out", str(out), "--md", str(md)]) == 0
    payload = json.loads(out.read_text())
    assert payload["rounds"] == 3 and payload["shape"]["d"] == 32
    rows = {r["variant"]: r for r in payload["results"]}
    assert list(rows) == ["bf16", "int8 full", "fp8 current"]
    for r in rows.values():
        assert r["over_bf16"] == pytest.approx(r["ms"] / rows["bf16"]["ms"])
        assert r["tokens_per_s"] == pytest.approx(2 * 8 / (r["ms"] / 1e3))
        assert 0 < r["loss"] < 2 * np.log(bench.CLASSES)  # trained steps, finite, near chance
    dots = {name: dict(p.split(": ") for p in r["dots"].split(", ")) for name, r in rows.items()}
    # 7 Linear layers (q, k, v, o, fc1, fc2, head), each with forward, dL/dx and dL/dW; the
    # attention products (2 forward, 4 backward) stay bf16; no f32 contraction but of scale vectors
    assert dots["bf16"] == {"bf16 x bf16": "25", "f32 x bf16": "2"}
    assert dots["int8 full"] == {"bf16 x bf16": "4", "f32 x bf16": "2", "i8 x i8": "21"}
    fp8 = {"f8E4M3FN x f8E4M3FN": "7", "f8E5M2 x f8E4M3FN": "7", "f8E4M3FN x f8E5M2": "7"}
    assert dots["fp8 current"] == {"bf16 x bf16": "4", "f32 x bf16": "2", **fp8}
    table = md.read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| fp8 current |" in table and "1 blocks d=32 (4 heads), batch 2 x 8 tokens" in table


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--d", "96", "--heads", "4"])
    err = capsys.readouterr().err
    assert "--d 96: give a multiple of --heads (4) and, with 'fp8 block-wise', of 128" in err
    with pytest.raises(ValueError, match="include 'bf16'"):
        bench.run(d=32, heads=4, layers=1, batch=1, tokens=4, rounds=1, budget_s=0, variants=["int8 full"])


@pytest.mark.parametrize("variant", ["int8 full", "fp8 current"])
def test_the_quantized_steps_lower_for_cuda(variant):
    """What the device runs: the step's program lowers for the GPU with its low-precision dots."""
    batch = (jnp.ones((1, 8, 32), jnp.bfloat16), jnp.zeros((1, 8), jnp.int32))
    step = bench.make_steps(32, 4, 1, ["bf16", variant], batch)[variant]
    traced = jax.jit(step.pure).trace(step.graphdef, step.state, batch)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert ("xi8>" if variant == "int8 full" else "xf8E5M2>") in text


def test_the_device_script_arguments_parse_within_its_limit(monkeypatch, tmp_path):
    """scripts/device_training.sh: its one step's arguments parse (a typo found on the device
    costs device time) and the run's own budget ends well before the step's hard limit."""
    text = (ROOT / "scripts" / "device_training.sh").read_text().replace("\\\n", " ")
    (step,) = re.findall(r'timeout (\d+) "\$py" -m experiments\.scripts\.bench_train_step_device (.*)', text)
    args = shlex.split(step[1].split("2>&1")[0].replace("$out", str(tmp_path)))
    seen = {}
    monkeypatch.setattr(bench, "run", lambda **kw: seen.update(kw) or {"device": "-", "results": []})
    monkeypatch.setattr(bench, "to_markdown", lambda result: "")
    assert bench.main(args) == 0
    assert seen["variants"] == list(bench.VARIANTS) and seen["d"] % 128 == 0
    assert seen["budget_s"] + 40 <= int(step[0]) <= 170  # 3 rounds and the warm-up after the budget
    assert re.search(rf"at most {step[0]} s", text)


def test_a_non_finite_loss_fails_the_run_after_writing_it(monkeypatch, tmp_path, capsys):
    rows = [{"variant": "bf16", "loss": 5.5}, {"variant": "fp8 current", "loss": float("nan")}]
    monkeypatch.setattr(bench, "run", lambda **kw: {"device": "-", "results": rows})
    monkeypatch.setattr(bench, "to_markdown", lambda result: "table\n")
    out = tmp_path / "step.json"
    assert bench.main(["--d", "128", "--heads", "4", "--out", str(out)]) == 1
    assert "the loss of fp8 current is not finite" in capsys.readouterr().err
    assert out.exists()
