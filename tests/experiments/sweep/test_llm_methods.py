"""SmoothQuant, LLM.int8(), AWQ and GPTQ on a tiny random Llama (seconds): what each must leave
unchanged, what it must equal at its limits, and that its quantized model is what it pinned."""

from __future__ import annotations

import math
import types

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from experiments.sweep import llm_methods
from qjax import QuantSpec
from qjax.methods.awq import awq_blocks
from qjax.methods.gptq import gptq_blocks
from qjax.methods.sequential import pin_weights
from qjax.models.llama import TINY, Llama

INT8_CH = QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
INT3_CH = QuantSpec(dtype="int3", granularity="per_channel", axis=-1)
INT4_G32 = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=32)
BLOCK_LINEARS = r"layers/.*"
ATTN8 = qjax.nn.Rule(path=".*", kind="attention", activations=QuantSpec(dtype="int8"))


def _model(seed=0):
    model = Llama(TINY, rngs=nnx.Rngs(seed))
    # outlier input features, as in real LLMs: a few channels of the norms' gains much larger
    for layer in model.layers:
        for norm in (layer.attn_norm, layer.mlp_norm):
            w = np.ones(TINY.dim, np.float32)
            w[[3, 17]] = 50.0
            norm.weight.set_value(jnp.asarray(w))
    return model


def _tokens(seed, n=4, t=32):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, (n, t)), jnp.int32)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _rules(weights, activations=None, scale="dynamic"):
    return [
        qjax.nn.Rule(path=BLOCK_LINEARS, weights=weights, activations=activations, activation_scale=scale)
    ]


def test_smoothquant_leaves_the_float_model_unchanged_and_helps_w8a8():
    model, tokens, calib = _model(), _tokens(1), [_tokens(2), _tokens(3)]
    ref = _logits(model, tokens)
    per_tensor = QuantSpec(dtype="int8")
    plain = qjax.nn.quantize_model(nnx.clone(model), _rules(INT8_CH, per_tensor))
    smoothed = nnx.clone(model)
    llm_methods.smooth_llama(smoothed, calib, alpha=0.5)
    np.testing.assert_allclose(
        _logits(smoothed, tokens), ref, rtol=2e-4, atol=2e-4 * float(jnp.abs(ref).max())
    )
    with_down = nnx.clone(model)
    llm_methods.smooth_llama(with_down, calib, alpha=0.5, pairs=True)
    np.testing.assert_allclose(
        _logits(with_down, tokens), ref, rtol=2e-4, atol=2e-4 * float(jnp.abs(ref).max())
    )
    assert not np.allclose(
        with_down.layers[0].mlp.down_proj.kernel[...], model.layers[0].mlp.down_proj.kernel[...]
    )
    smoothed_q = qjax.nn.quantize_model(smoothed, _rules(INT8_CH, per_tensor))
    assert _rel(_logits(smoothed_q, tokens), ref) < 0.5 * _rel(_logits(plain, tokens), ref)


def test_llm_int8_limits_at_model_level():
    model, tokens = _model(), _tokens(4)
    ref = _logits(model, tokens)
    everything_float = nnx.clone(model)
    assert qjax.methods.apply_llm_int8(everything_float, BLOCK_LINEARS, threshold=0.0) == 7 * TINY.n_layers
    np.testing.assert_allclose(_logits(everything_float, tokens), ref, rtol=1e-5, atol=1e-5)
    no_outliers = nnx.clone(model)
    qjax.methods.apply_llm_int8(no_outliers, BLOCK_LINEARS, threshold=math.inf)
    vector_wise = qjax.nn.quantize_model(
        nnx.clone(model), _rules(INT8_CH, QuantSpec(dtype="int8", granularity="per_token"))
    )
    y, y_ref = _logits(no_outliers, tokens), _logits(vector_wise, tokens)
    assert _rel(y, y_ref) < 1e-4  # the same vector-wise int8, up to float rounding
    with_outliers = nnx.clone(model)
    qjax.methods.apply_llm_int8(with_outliers, BLOCK_LINEARS, threshold=6.0)
    assert _rel(_logits(with_outliers, tokens), ref) < _rel(y, ref)


def _pinned_model_equals_its_weights(model, pinned, rules, tokens):
    """The quantized model with the pinned grids computes what the float model with w_hat does."""
    float_hat = nnx.clone(model)
    layers = dict(qjax.nn.model.quantizable_layers(float_hat))
    for path, (w_hat, _) in pinned.items():
        layers[path].kernel.set_value(w_hat)
    quantized = pin_weights(qjax.nn.quantize_model(nnx.clone(model), rules), pinned)
    np.testing.assert_allclose(_logits(quantized, tokens), _logits(float_hat, tokens), rtol=1e-5, atol=1e-5)
    served = qjax.nn.convert(quantized)
    np.testing.assert_allclose(_logits(served, tokens), _logits(float_hat, tokens), rtol=1e-4, atol=1e-4)
    return quantized


@pytest.mark.parametrize("spec", [INT3_CH, INT4_G32], ids=["int3-channel", "int4-g32"])
def test_gptq_model_beats_rtn_and_pins_its_weights(spec):
    model, tokens = _model(), _tokens(5)
    calib = [_tokens(6, n=8)]
    ref = _logits(model, calib[0])
    gptq_model = nnx.clone(model)
    blocks, _ = llm_methods.llama_blocks(gptq_model)
    report: list[dict] = []
    pinned = gptq_blocks(
        blocks, llm_methods.calibration_hidden(gptq_model, calib), lambda p: spec, report=report
    )
    assert len(pinned) == 7 * TINY.n_layers and len(report) == len(pinned)
    assert all(r["error"] <= r["rtn_error"] for r in report)
    rules = _rules(spec)
    gptq_q = _pinned_model_equals_its_weights(model, pinned, rules, tokens)
    rtn_q = qjax.nn.quantize_model(nnx.clone(model), rules)
    assert _rel(_logits(gptq_q, calib[0]), ref) < _rel(_logits(rtn_q, calib[0]), ref)


def test_awq_folds_exactly_and_pins_its_weights():
    model, tokens = _model(), _tokens(7)
    calib = [_tokens(8, n=8)]
    ref = _logits(model, tokens)
    awq_model = nnx.clone(model)
    blocks, folds = llm_methods.llama_blocks(awq_model)
    assert folds[0][1] is None  # grouped-query attention: no free scale between v_proj and o_proj
    report: list[dict] = []
    pinned = awq_blocks(
        blocks,
        folds,
        llm_methods.calibration_hidden(awq_model, calib),
        lambda p: INT4_G32,
        grid=5,
        report=report,
    )
    # the scaled float model (kernels not yet replaced by the quantized ones) computes what it did
    np.testing.assert_allclose(
        _logits(awq_model, tokens), ref, rtol=2e-4, atol=2e-4 * float(jnp.abs(ref).max())
    )
    searches = [r for r in report if "alpha" in r]
    assert len(searches) == 3 * TINY.n_layers and all(r["error"] <= r["rtn_error"] for r in searches)
    assert all(r["clip_error"] <= r["unclipped_error"] for r in report if "clip_error" in r)
    _pinned_model_equals_its_weights(awq_model, pinned, _rules(INT4_G32), tokens)


def test_apply_llm_method_dispatch():
    model, calib = _model(), [_tokens(9, n=2)]
    for method, rules in [
        (dict(name="llm_int8"), []),
        (dict(smoothquant_alpha=0.5), _rules(INT8_CH, QuantSpec(dtype="int8", granularity="per_token"))),
        (dict(smoothquant_alpha=0.5), [*_rules(QuantSpec(dtype="int8"), QuantSpec(dtype="int8")), ATTN8]),
        (dict(awq=True, awq_grid=3), _rules(INT4_G32)),
        (dict(gptq=True), _rules(INT4_G32)),
    ]:
        m = types.SimpleNamespace(
            name="ptq",
            smoothquant_alpha=None,
            smoothquant_pairs=True,
            awq=False,
            gptq=False,
            awq_grid=20,
            gptq_damp=0.01,
            gptq_act_order=False,
            gptq_block_size=128,
            llm_int8_threshold=6.0,
        )
        vars(m).update(method)
        info: dict = {}
        out = llm_methods.apply_llm_method(
            types.SimpleNamespace(method=m), model, calib, rules, qjax.nn.quantize_model, info
        )
        assert np.isfinite(np.asarray(_logits(out, calib[0]))).all()
        assert ("layers" in info) == (m.awq or m.gptq)
        attention = len(qjax.nn.attention_ops(out))
        assert attention == (TINY.n_layers if ATTN8 in rules else 0)  # SmoothQuant O2 with int8 BMMs
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.all(a == b)), nnx.state(model), nnx.state(_model()))
    )


def test_rotation_runs_first_and_the_methods_fold_only_where_exact():
    """``method.rotation``: the runner's base model is the rotated one (a new model); AWQ keeps its
    norm folds but has none for down_proj behind the online Hadamard, and SmoothQuant's down_proj
    pairs are refused there."""
    from experiments.sweep import runner

    model = _model()
    method = types.SimpleNamespace(
        rotation="hadamard",
        rotation_seed=3,
        rotation_online_down=True,
        rotation_qk=False,
        fold_batchnorm=True,
    )
    cfg = types.SimpleNamespace(method=method, task=types.SimpleNamespace(name="llm", model="gguf"))
    base = runner.prepare_base(cfg, None, model)
    assert base is not model and base.config.down_hadamard and not base.config.tie_embeddings
    assert model.config == TINY  # the float model is left as it is
    tokens = _tokens(11)
    ref = _logits(model, tokens)
    np.testing.assert_allclose(_logits(base, tokens), ref, rtol=0, atol=1e-4 * float(jnp.abs(ref).max()))
    _, folds = llm_methods.llama_blocks(base)
    assert all(f[0] is not None and f[2] is not None and f[1] is None and f[3] is None for f in folds)
    with pytest.raises(ValueError, match="down_proj reads an online-rotated input"):
        llm_methods.smooth_llama(base, [tokens], alpha=0.5, pairs=True)


def test_outlier_table():
    rows = llm_methods.outlier_table(_model(), [_tokens(10, n=2)], threshold=6.0)
    assert len(rows) == 4 * TINY.n_layers
    assert {r["input_of"] for r in rows} == {
        "q_proj/k_proj/v_proj",
        "o_proj",
        "gate_proj/up_proj",
        "down_proj",
    }
    first = rows[0]  # the norm gains of 50 on two channels make them outliers of q/k/v's input
    assert first["n_outlier_features"] >= 2 and first["max_over_median"] > 5
