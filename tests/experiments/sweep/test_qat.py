"""QAT of a pretrained LLM (experiments.sweep.qat, llm_methods.start_qat) on a tiny GGUF checkpoint:
a distilled QAT cell from AWQ end to end (the KD loss falls, gradients stay finite, the teacher and
the frozen embedding stay as they were, training sees training windows only), where QAT starts
from a PTQ method's weights and grid, and the errors of bad settings."""

import dataclasses
import functools
import json

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import llm_methods, run, runner, tracking, train_loop
from experiments.tasks import llm
from qjax.models.llama import TINY, Llama
from qjax.models.perplexity import pydoc_text, tokenize
from qjax.nn.model import quantizable_layers
from qjax.numerics.calibration import block_range
from tests.models.test_llama import GGUF_CONFIG, random_model, write_gguf

TIED = dataclasses.replace(GGUF_CONFIG, tie_embeddings=True)
WINDOW, EVAL_WINDOWS, TRAIN_WINDOWS = 32, 4, 8
INT4_G32 = qjax.QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=32)
INT4_G32_ASYM = dataclasses.replace(INT4_G32, symmetric=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = random_model(TIED)
    # a larger tied embedding sharpens the next-token distributions, so quantization moves them
    model.embed.embedding.set_value(model.embed.embedding[...] * 8.0)
    return write_gguf(tmp_path_factory.mktemp("llm") / "tiny.gguf", model, TIED)


def config_text(path, method=""):
    """A distilled QAT cell on the tiny checkpoint at ``path`` (``None``: on the digits task)."""
    windows = f"{{window: {WINDOW}, eval_windows: {EVAL_WINDOWS}, calibration_windows: {TRAIN_WINDOWS}}}"
    task = f"{{name: llm, model: gguf, data_dir: {path}, data_args: {windows}}}"
    return f"""
name: llm_qat
task: {task if path is not None else "{name: digits, model: mlp}"}
method: {{name: qat, distill: true, steps: 4, learning_rate: 0.0003, schedule: constant, {method}}}
train: {{batch_size: {TRAIN_WINDOWS}, checkpoint_every: 100}}
quant:
  weights: {{dtype: int4, granularity: per_group, axis: 0, group_size: 32}}
  overrides: [{{path: embed, keep_float: true}}]
calibration: {{batches: 1, batch_size: {TRAIN_WINDOWS}}}
eval: {{batch_size: 4, diagnostics: false, before_qat: true}}
tracking: {{log_every: 1, tensorboard: false}}
report: {{metric: perplexity}}
"""


def load(tmp_path, text, *overrides):
    path = tmp_path / "qat.yaml"
    path.write_text(text)
    return config_lib.load(path, [f"output_dir={tmp_path}", *overrides])


def positions(tokens, row):
    """Every start position of ``row`` in the token stream ``tokens``."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, len(row))
    return np.flatnonzero((windows == row).all(axis=1))


def test_distilled_qat_from_awq_end_to_end(checkpoint, tmp_path, monkeypatch):
    """Every step trains on all the training windows (one batch), so the KD loss of step 1 (the
    AWQ model) and of the last step are comparable: it must fall. The teacher (the float model) and
    the frozen embedding are never changed, and no step sees a token of the evaluation windows."""
    seen, held = [], {}
    make_step = train_loop.training.make_train_step

    def recording(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def wrapped(model, optimizer, inputs):
            batch, teacher = inputs
            seen.append(np.asarray(batch[0]))
            held.update(student=model, teacher=teacher, teacher_state=nnx.clone(teacher))
            return step(model, optimizer, inputs)

        return wrapped

    monkeypatch.setattr(train_loop.training, "make_train_step", recording)
    sweep_dir = run.run_sweep(
        load(tmp_path, config_text(checkpoint, "awq: true, awq_grid: 5, freeze: [embed]"))
    )
    [record] = records.read_results(sweep_dir)
    assert record["status"] == "ok", record["error"]
    metrics = record["metrics"]
    assert {"perplexity", "loss", "ptq_perplexity", "ptq_loss"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    rows = [
        r
        for r in tracking.read_metrics(sweep_dir / record["run_dir"] / "metrics.jsonl")
        if r["phase"] == "qat"
    ]
    assert [r["step"] for r in rows] == list(range(1, 5))
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [r["loss"] for r in rows]
    info = json.loads((sweep_dir / record["run_dir"] / "llm_method.json").read_text())
    assert any("alpha" in r for r in info["layers"])  # AWQ ran, and QAT started from its model

    student, teacher = held["student"], held["teacher"]
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), nnx.state(teacher), nnx.state(held["teacher_state"]))
    )
    np.testing.assert_array_equal(student.embed.embedding[...], teacher.embed.embedding[...])
    moved = student.layers[0].attn.q_proj.kernel[...] != teacher.layers[0].attn.q_proj.kernel[...]
    assert bool(jnp.any(moved))

    task = llm.make_task(
        str(checkpoint), window=WINDOW, eval_windows=EVAL_WINDOWS, calibration_windows=TRAIN_WINDOWS
    )
    tokens = tokenize(llm.load_checkpoint(str(checkpoint)).tokenizer, pydoc_text())
    assert len(seen) == 4
    for row in np.unique(np.concatenate(seen), axis=0):
        assert any((row == t).all() for t in task.train.x)
        found = positions(tokens, row)
        assert found.size and found.min() >= EVAL_WINDOWS * WINDOW  # after the evaluation windows


def test_training_windows_are_disjoint_from_the_evaluation_windows(checkpoint):
    """However many training windows are asked for, they start after the evaluation's tokens; one
    window more than the text holds is refused with the fix."""
    tokens = tokenize(llm.load_checkpoint(str(checkpoint)).tokenizer, pydoc_text())
    most = (len(tokens) - EVAL_WINDOWS * WINDOW) // WINDOW
    task = llm.make_task(str(checkpoint), window=WINDOW, eval_windows=EVAL_WINDOWS, calibration_windows=most)
    assert len(task.train) == most
    first = len(tokens) - most * WINDOW
    assert first >= EVAL_WINDOWS * WINDOW
    np.testing.assert_array_equal(task.train.x, tokens[first:].reshape(most, WINDOW))
    np.testing.assert_array_equal(task.test.x, tokens[: EVAL_WINDOWS * WINDOW].reshape(EVAL_WINDOWS, WINDOW))
    with pytest.raises(ValueError, match=r"after the 128 reserved for evaluation.*lower n or length"):
        llm.make_task(str(checkpoint), window=WINDOW, eval_windows=EVAL_WINDOWS, calibration_windows=most + 1)


@functools.partial(jax.jit, static_argnums=1)
def _clipped(w, spec):
    lo, hi = block_range(w, spec, (32, 1))
    qp = spec.affine_format.qparams(0.7 * lo, 0.7 * hi, spec.symmetric)
    return qjax.quantize_dequantize(w, spec, qparams=qp), qp


def _clipped_pins(model, spec):
    """A PTQ method's result as AWQ's clipping leaves it: per layer, a grid shrunk to 0.7 of the
    kernel's range and the kernel quantized on it."""
    return {
        p: _clipped(layer.kernel[...], spec)
        for p, layer in quantizable_layers(model)
        if p.startswith("layers/")
    }


_fake_quant = jax.jit(qjax.fake_quant, static_argnums=(1, 2))  # one compile per kernel shape


@pytest.mark.parametrize(
    "estimator, spec",
    [("ste", INT4_G32), ("lsq", INT4_G32), ("ste", INT4_G32_ASYM)],
    ids=["ste", "lsq", "ste-asym"],
)
def test_start_qat_keeps_the_ptq_model(estimator, spec):
    """From a clipped grid: with the float kernels as latent weights (AWQ) or the quantized ones
    (GPTQ), and with dynamic scales from the quantized weights, every layer's weight as the forward
    pass quantizes it is the PTQ method's (so the model computes the PTQ model); the float latent
    weights keep their clipped tails, and LSQ's step sizes start from the grid."""
    model = Llama(TINY, rngs=nnx.Rngs(0))
    rules = [qjax.nn.Rule(path="layers/.*", weights=spec, weight_estimator=estimator)]
    pins = _clipped_pins(model, spec)
    starts = [dict(float_latent=True, keep_grid=True), dict(float_latent=False, keep_grid=True)]
    if estimator == "ste":
        starts.append(dict(float_latent=True, keep_grid=False))
    for how in starts:
        start = llm_methods.start_qat(qjax.nn.quantize_model(model, rules), pins, **how)
        floats = dict(quantizable_layers(model))
        for path, layer, op in qjax.nn.quantized_ops(start):
            w_hat, qp = pins[path]
            kernel = layer.kernel[...]
            learned = None if op.weight_scale is None else op.weight_scale[...]
            effective = _fake_quant(kernel, spec, estimator, qparams=op.weight_qparams(), scale=learned)
            np.testing.assert_allclose(effective, w_hat, rtol=1e-6, atol=1e-7)
            latent = floats[path].kernel[...] if how["float_latent"] and how["keep_grid"] else w_hat
            np.testing.assert_array_equal(kernel, latent)
            grid = learned if estimator == "lsq" else op.weight_qparams()
            if not how["keep_grid"]:
                assert grid is None
            else:
                np.testing.assert_array_equal(grid if estimator == "lsq" else grid.scale, qp.scale)


@pytest.mark.parametrize(
    "method, override, where, message",
    [
        (
            "",
            "",
            "method.distill",
            r"distils the llm task's next-token distributions \(task\.name is 'digits'\); "
            r"set task\.name: llm",
        ),
        ("name: ptq", "", "method.distill", r"set method\.name: qat \(it is 'ptq'\)"),
        ("name: finetune, awq: true", "", "method.awq", r"set method\.name: ptq or qat \(it is 'finetune'\)"),
        (
            "distill: false, distill_temperature: 2.0",
            "",
            "method.distill_temperature",
            r"set method\.distill: true",
        ),
        ("distill_temperature: 0", "", "method.distill_temperature", r"0\.0 must be > 0"),
        ("distill_weight: 1.5", "", "method.distill_weight", r"1\.5 must be in \[0, 1\]"),
        (
            "keep_ptq_grid: false",
            "",
            "method.keep_ptq_grid",
            r"set method\.name: qat with method\.awq or method\.gptq",
        ),
        (
            "awq: true, keep_ptq_grid: false",
            "quant.weight_estimator=lsq",
            "method.keep_ptq_grid",
            r"weight_estimator 'lsq' learns them: set keep_ptq_grid: true",
        ),
        ("freeze: ['(']", "", r"method\.freeze\[0\]", r"'\(' is not a regular expression"),
        ("name: ptq, distill: false, freeze: [embed]", "", "method.freeze", r"only qat and finetune train"),
        ("name: ptq, distill: false", "", "eval.before_qat", r"only a qat cell uses it"),
    ],
)
def test_bad_settings_are_named_before_compute(tmp_path, method, override, where, message):
    text = config_text(None if "digits" in message else "unused.gguf", method)
    with pytest.raises(config_lib.ConfigError, match=rf"{where}: .*{message}"):
        load(tmp_path, text, *([override] if override else []))


def test_runtime_errors_name_the_fix(checkpoint, tmp_path):
    """A freeze pattern that matches no parameter, and a QAT run of 0 steps, fail before training."""
    with pytest.raises(ValueError, match=r"method\.freeze: 'embedding_table' matches no parameter.*'embed'"):
        train_loop.trainable(Llama(TINY, rngs=nnx.Rngs(0)), ["embedding_table"])
    [cell] = load(tmp_path, config_text(checkpoint), "method.steps=0", "train.batch_size=16").cells()
    task = runner.load_task(cell.config)
    with pytest.raises(ValueError, match=r"is 0 steps; set method\.steps, or a train\.batch_size <= 8"):
        runner.fine_tune(cell.config, task, task.make_model("gguf", {}, 0), tmp_path / "cell", None)
