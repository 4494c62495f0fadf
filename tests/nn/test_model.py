"""qjax.nn: rules, quantize_model, the qat and calibrate modes, learned quantizers, errors, Linen.

References are computed independently: float64 numpy where the quantizer is simple enough to
write by hand, otherwise the lax op applied to ``qjax.quantize_dequantize``'d operands (the
quantizer itself is tested against numpy in ``test_reference.py``). Serving is in
``test_nn_serve.py``.
"""

import dataclasses
import logging
import math

import flax.linen as linen
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax import QParams, QuantSpec
from qjax.nn import (
    FrozenQuantizedOp,
    QuantizedContraction,
    QuantizedEmbedding,
    QuantizedOp,
    QuantStats,
    Rule,
    StaticQParams,
    UnusedRuleWarning,
)
from qjax.nn.ops import update_op

fq = jax.jit(qjax.quantize_dequantize, static_argnums=1)  # (x, spec) -> Q(x), one compile per shape

W8_CH = QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
W4_CH = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
W4_G16 = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=16)
A8_TOKEN = QuantSpec(dtype="int8", granularity="per_token")
A8_TENSOR = QuantSpec(dtype="int8")
DN = (((1,), (0,)), ((), ()))  # x @ W


# --- models ------------------------------------------------------------------------------------


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(32, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


class Branches(nnx.Module):
    """Three Linear layers reading the same input (one compile covers three rules)."""

    def __init__(self, rngs: nnx.Rngs):
        self.branches = nnx.List([nnx.Linear(32, 8, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        return tuple(b(x) for b in self.branches)


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.convs = nnx.List(
            [
                nnx.Conv(4, 8, (3, 3), strides=2, padding="SAME", rngs=rngs),
                nnx.Conv(8, 8, (3, 3), padding="VALID", rngs=rngs),
            ]
        )

    def __call__(self, x):
        return self.convs[1](jax.nn.relu(self.convs[0](x)))


D, N, H, V = 32, 2, 8, 40


class Attn(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.Einsum("btd,dnh->btnh", (D, N, H), (N, H), rngs=rngs)
        self.out = nnx.Linear(N * H, D, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn = Attn(rngs)


class TinyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.head = nnx.Linear(D, V, rngs=rngs)


@nnx.jit
def apply(module, x):
    return module(x)


def normal(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def rows(model):
    return {r["path"]: r for r in qjax.nn.summary(model)}


# --- rules -------------------------------------------------------------------------------------


def test_first_matching_rule_applies():
    lm = TinyLM(nnx.Rngs(0))
    q = qjax.nn.quantize_model(lm, [Rule(path=r".*attn.*", weights=W4_CH), Rule(path=".*", weights=W8_CH)])
    r = rows(q)
    for i in (0, 1):
        assert r[f"blocks/{i}/attn/query"]["weights"] == "int4"
        assert r[f"blocks/{i}/attn/out"]["weights"] == "int4"
    assert r["head"]["weights"] == r["embed"]["weights"] == "int8"
    assert {p: row["layer"] for p, row in r.items()} == {
        "embed": "Embed",
        "blocks/0/attn/query": "Einsum",
        "blocks/0/attn/out": "Linear",
        "blocks/1/attn/query": "Einsum",
        "blocks/1/attn/out": "Linear",
        "head": "Linear",
    }


def test_path_is_a_full_match_and_unused_rules_warn(caplog):
    lm = TinyLM(nnx.Rngs(0))
    rules = [Rule(path="blocks/1/attn/query", weights=W8_CH), Rule(path="blocks/1", weights=W4_CH)]
    unused = pytest.warns(
        UnusedRuleWarning, match=r"rule 1 \(path='blocks/1', kind='layer'\) matched no layer"
    )
    with caplog.at_level(logging.WARNING, logger="qjax"), unused:
        q = qjax.nn.quantize_model(lm, rules)
    assert [path for path, _, _ in qjax.nn.quantized_ops(q)] == ["blocks/1/attn/query"]
    assert isinstance(q.blocks[1].attn.query.einsum_op, QuantizedContraction)
    assert not isinstance(q.blocks[0].attn.query.einsum_op, QuantizedContraction)
    (message,) = [r.getMessage() for r in caplog.records if "left in float" in r.getMessage()]
    left = {line.split(" (")[0].strip(): line.split(": ", 1)[1] for line in message.splitlines()[1:]}
    float_paths = {"embed", "head", "blocks/0/attn/query", "blocks/0/attn/out", "blocks/1/attn/out"}
    assert left == dict.fromkeys(float_paths, "no rule matched")


def test_exclusion_rule_keeps_a_layer_float():
    lm = TinyLM(nnx.Rngs(0))
    q = qjax.nn.quantize_model(
        lm, [Rule(path="head"), Rule(path="embed|.*query"), Rule(path=".*", weights=W8_CH)]
    )
    r = rows(q)
    assert r["head"]["mode"] == r["embed"]["mode"] == r["blocks/0/attn/query"]["mode"] == "float"
    assert q.head.dot_general is jax.lax.dot_general
    assert not isinstance(q.embed.promote_dtype, QuantizedEmbedding)
    assert r["blocks/0/attn/out"]["mode"] == "qat" and r["blocks/0/attn/out"]["weights"] == "int8"


def test_bad_regex_names_the_rule():
    with pytest.raises(ValueError, match=r"Rule path='blocks/\(0' is not a valid regular expression"):
        Rule(path="blocks/(0", weights=W8_CH)


def test_rule_from_dict_unknown_key_suggests_the_field():
    with pytest.raises(ValueError, match=r"unknown Rule field 'weight'; did you mean 'weights'\?"):
        Rule.from_dict({"path": ".*", "weight": {"dtype": "int8"}})
    with pytest.raises(ValueError, match=r"unknown QuantSpec field 'dtyp'; did you mean 'dtype'\?"):
        Rule.from_dict({"path": ".*", "weights": {"dtyp": "int8"}})


def test_dict_specs_inside_rules():
    d = {
        "path": "layers/.*",
        "weights": {"dtype": "int4", "granularity": "per_group", "axis": 0, "group_size": 16},
        "activations": {"dtype": "int8", "granularity": "per_token"},
        "activation_estimator": "clipped_ste",
    }
    rule = Rule.from_dict(d)
    assert rule.weights == W4_G16 and rule.activations == A8_TOKEN
    assert rule.activation_estimator == qjax.Estimator.CLIPPED_STE
    q = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [d])  # mappings are accepted as rules too
    assert [op.rule for _, _, op in qjax.nn.quantized_ops(q)] == [rule, rule]


# --- quantize_model ----------------------------------------------------------------------------


def test_quantize_model_leaves_the_float_model_unchanged(rng):
    mlp = MLP(nnx.Rngs(0))
    x = normal(rng, 4, 32)
    state = [np.array(a) for a in jax.tree.leaves(nnx.state(mlp))]
    y = np.array(apply(mlp, x))
    q = qjax.nn.quantize_model(mlp, [Rule(path=".*", weights=W4_CH, activations=A8_TOKEN)])
    assert type(q) is MLP and q is not mlp
    yq = apply(q, x)
    served = qjax.nn.convert(q)
    apply(served, x)
    assert qjax.nn.quantized_ops(mlp) == []
    assert all(layer.dot_general is jax.lax.dot_general for layer in mlp.layers)
    for before, after in zip(state, jax.tree.leaves(nnx.state(mlp)), strict=True):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(apply(mlp, x), y)
    assert np.max(np.abs(np.array(yq) - y)) > 1e-3  # the quantized copy does quantize


def test_embed_weights_are_fake_quantized_in_both_call_paths(rng):
    lm = TinyLM(nnx.Rngs(0))
    spec = QuantSpec(dtype="int4", granularity="per_channel", axis=0)
    q = qjax.nn.quantize_model(lm, [Rule(path="embed", weights=spec), Rule(path=".*")])
    ids = jnp.asarray(rng.integers(0, V, size=(2, 5)), jnp.int32)
    table_hat = np.array(fq(lm.embed.embedding[...], spec))
    np.testing.assert_array_equal(apply(q.embed, ids), table_hat[np.array(ids)])
    x = normal(rng, 3, D)
    np.testing.assert_allclose(q.embed.attend(x), np.array(x) @ table_hat.T, rtol=1e-5, atol=1e-5)


def test_activations_of_a_rule_are_not_applied_to_an_embed(caplog):
    """An Embed's input is integer ids: a rule with activations quantizes its table only."""
    lm = TinyLM(nnx.Rngs(0))
    with caplog.at_level(logging.INFO, logger="qjax"):
        q = qjax.nn.quantize_model(lm, [Rule(path=".*", weights=W8_CH, activations=A8_TENSOR)])
    assert "layer embed is an Embed: activations of rule '.*' not applied" in caplog.text
    assert q.embed.promote_dtype.rule.activations is None
    assert q.embed.promote_dtype.rule.weights == W8_CH


# --- qat forward equals the lax op on fake-quantized operands -----------------------------------


def test_qat_linear_matches_float64_numpy(rng):
    mlp = MLP(nnx.Rngs(0))
    q = qjax.nn.quantize_model(mlp, [Rule(path="layers/0", weights=W8_CH, activations=A8_TOKEN)])
    x = np.asarray(rng.normal(size=(4, 32)), np.float32)
    w = np.asarray(mlp.layers[0].kernel[...], np.float64)
    b = np.asarray(mlp.layers[0].bias[...], np.float64)
    sx = np.max(np.abs(x), axis=1, keepdims=True) / 127  # per token
    sw = np.max(np.abs(w), axis=0, keepdims=True) / 127  # per output channel
    ref = (np.round(x / sx) * sx) @ (np.round(w / sw) * sw) + b
    np.testing.assert_allclose(apply(q.layers[0], jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)


def test_qat_linear_per_token_per_channel_and_per_tensor_per_group(rng):
    mlp = MLP(nnx.Rngs(0))
    rules = [
        Rule(path="layers/0", weights=W8_CH, activations=A8_TOKEN),
        Rule(path="layers/1", weights=W4_G16, activations=A8_TENSOR),
    ]
    q = qjax.nn.quantize_model(mlp, rules)
    for layer, rule, x in zip(mlp.layers, rules, (normal(rng, 4, 32), normal(rng, 4, 32)), strict=True):
        i = int(rule.path[-1])
        ref = jax.lax.dot_general(fq(x, rule.activations), fq(layer.kernel[...], rule.weights), DN)
        np.testing.assert_allclose(apply(q.layers[i], x), ref + layer.bias[None], rtol=1e-6, atol=1e-6)


def test_qat_conv_matches_lax_conv_of_fake_quantized_operands(rng):
    cnn = CNN(nnx.Rngs(0))
    w4_cin = QuantSpec(dtype="int4", granularity="per_group", axis=2, group_size=4)
    rules = [
        Rule(path="convs/0", weights=W8_CH, activations=A8_TENSOR),
        Rule(path="convs/1", weights=w4_cin, activations=A8_TOKEN),
    ]
    q = qjax.nn.quantize_model(cnn, rules)
    cases = [(normal(rng, 2, 8, 8, 4), 2, "SAME"), (normal(rng, 2, 4, 4, 8), 1, "VALID")]
    for i, (rule, (x, stride, padding)) in enumerate(zip(rules, cases, strict=True)):
        conv = cnn.convs[i]
        ref = jax.lax.conv_general_dilated(
            fq(x, rule.activations),
            fq(conv.kernel[...], rule.weights),
            (stride, stride),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        out = apply(q.convs[i], x)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref + conv.bias[None, None, None], rtol=1e-5, atol=1e-5)


def test_qat_einsum_matches_einsum_of_fake_quantized_operands(rng):
    lm = TinyLM(nnx.Rngs(0))
    w8_nh = QuantSpec(dtype="int8", granularity="per_channel", axis=(1, 2))
    rules = [
        Rule(path="blocks/0/attn/query", weights=w8_nh, activations=A8_TOKEN),
        Rule(path="blocks/1/attn/query", weights=W4_G16, activations=A8_TENSOR),
        Rule(path=".*"),
    ]
    q = qjax.nn.quantize_model(lm, rules)
    x = normal(rng, 2, 3, D)
    for i, rule in enumerate(rules[:2]):
        layer = lm.blocks[i].attn.query
        ref = jnp.einsum("btd,dnh->btnh", fq(x, rule.activations), fq(layer.kernel[...], rule.weights))
        out = apply(q.blocks[i].attn.query, x)
        np.testing.assert_allclose(out, ref + layer.bias[None, None], rtol=1e-6, atol=1e-6)


# --- calibrate mode and static activations -----------------------------------------------------


def test_calibrate_mode_returns_float_output_and_collects_stats(rng):
    mlp = MLP(nnx.Rngs(0))
    rule = Rule(path=".*", weights=W8_CH, activations=A8_TENSOR, activation_scale="static", histogram_bins=16)
    q = qjax.nn.quantize_model(mlp, [rule], mode="calibrate")
    batches = [normal(rng, 4, 32, scale=s) for s in (3.0, 1.0, 0.5)]  # the first holds the max |x|
    for x in batches:
        np.testing.assert_allclose(apply(q, x), apply(mlp, x), rtol=1e-6, atol=1e-6)
    hidden = [np.maximum(np.array(apply(mlp.layers[0], x)), 0) for x in batches]
    for op_index, seen in ((0, [np.array(x) for x in batches]), (1, hidden)):
        a = np.concatenate([s.reshape(-1) for s in seen]).astype(np.float64)
        stats = qjax.nn.quantized_ops(q)[op_index][2].stats.get_value()
        assert int(stats["count"]) == a.size
        np.testing.assert_allclose(stats["min"], a.min(), rtol=1e-6)
        np.testing.assert_allclose(stats["max"], a.max(), rtol=1e-6)
        np.testing.assert_allclose(stats["mean_abs"], np.abs(a).mean(), rtol=1e-5)
        counts, _ = np.histogram(np.abs(a), bins=16, range=(0, np.abs(a).max()))
        np.testing.assert_array_equal(stats["hist"], counts)
    assert all("stats" not in path for path, _ in nnx.to_flat_state(nnx.state(q, nnx.Param)))


def test_quantizer_state_is_not_a_param():
    q = qjax.nn.quantize_model(
        MLP(nnx.Rngs(0)), [Rule(path=".*", activations=A8_TENSOR, activation_scale="static")]
    )
    q.layers[0].dot_general.static.set_value((jnp.ones(()), None, None))
    params = nnx.to_flat_state(nnx.state(q, nnx.Param))
    assert sorted(path for path, _ in params) == [
        ("layers", i, name) for i in (0, 1) for name in ("bias", "kernel")
    ]
    assert nnx.to_flat_state(nnx.state(q, QuantStats))
    assert nnx.to_flat_state(nnx.state(q, StaticQParams))


def _variable_paths(model):
    return {"/".join(map(str, path)): type(v).__name__ for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("estimator", ["ste", "clipped_ste"])
def test_dynamic_scale_layers_hold_no_quantizer_state(rng, estimator):
    """Dynamic scales and a stateless estimator read no calibration statistics: the quantized
    model holds exactly the float model's variables and its module graph no node more (the ops
    are frozen values, static attributes of their layers)."""
    mlp = MLP(nnx.Rngs(0))
    rule = Rule(path=".*", weights=W8_CH, activations=A8_TOKEN, activation_estimator=estimator)
    q = qjax.nn.quantize_model(mlp, [rule])
    assert _variable_paths(q) == _variable_paths(mlp)
    assert len(nnx.graphdef(q).nodes) == len(nnx.graphdef(mlp).nodes)
    assert not jax.tree.leaves(nnx.state(q, QuantStats)) and not jax.tree.leaves(nnx.state(q, StaticQParams))
    for _, _, op in qjax.nn.quantized_ops(q):
        assert isinstance(op, FrozenQuantizedOp)
        assert op.stats is None and op.static is None and op.weight_static is None and op.rngs is None
    x = normal(rng, 4, 32)
    before = np.asarray(apply(q, x))
    assert qjax.nn.calibrate(q, [x, 2 * x]) is q  # a no-op: nothing to calibrate
    assert _variable_paths(q) == _variable_paths(mlp)
    np.testing.assert_array_equal(apply(q, x), before)
    served = qjax.nn.convert(q)
    assert all(isinstance(op, FrozenQuantizedOp) for _, _, op in qjax.nn.quantized_ops(served))
    np.testing.assert_allclose(apply(served, x), before, rtol=0.05, atol=0.05)


def test_frozen_ops_change_by_replacement_and_a_jitted_forward_follows(rng):
    mlp = MLP(nnx.Rngs(0))
    q = qjax.nn.quantize_model(mlp, [Rule(path=".*", weights=W4_CH, activations=A8_TOKEN)])
    op = q.layers[0].dot_general
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.mode = "calibrate"
    forward = nnx.jit(apply)
    x = normal(rng, 4, 32)
    qat = np.asarray(forward(q, x))
    qjax.nn.set_mode(q, "calibrate")  # a new op value: the jitted forward retraces
    assert q.layers[0].dot_general.mode == "calibrate" and op.mode == "qat"
    np.testing.assert_allclose(forward(q, x), apply(mlp, x), rtol=1e-6, atol=1e-6)
    qjax.nn.set_mode(q, "qat")
    np.testing.assert_array_equal(forward(q, x), qat)
    qjax.nn.set_kernels(q, "reference")
    assert all(op.rule.kernels == "reference" for _, _, op in qjax.nn.quantized_ops(q))


def test_pinning_a_frozen_op_makes_it_a_module_with_the_grid(rng):
    q = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [Rule(path=".*", weights=W8_CH)])
    layer = q.layers[0]
    kernel = layer.kernel[...]
    scale = jnp.max(jnp.abs(kernel), axis=0, keepdims=True) / 127.0
    qjax.nn.pin_weight_qparams(layer, kernel, QParams(scale))
    assert isinstance(layer.dot_general, QuantizedOp)
    assert isinstance(q.layers[1].dot_general, FrozenQuantizedOp)
    np.testing.assert_array_equal(layer.dot_general.weight_static.get_value()[0], scale)
    assert "layers/0/dot_general/weight_static" in _variable_paths(q)
    served = qjax.nn.convert(q)  # the pinned grid is stored in the QArray; nothing is left to hold
    assert isinstance(served.layers[0].dot_general, FrozenQuantizedOp)
    np.testing.assert_allclose(served.layers[0].kernel[...].scale, scale, rtol=1e-6)


def test_static_scale_layers_hold_statistics_and_calibrate(rng):
    rule = Rule(path=".*", weights=W8_CH, activations=A8_TENSOR, activation_scale="static", histogram_bins=16)
    q = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [rule])
    paths = _variable_paths(q)
    for i in (0, 1):
        assert paths[f"layers/{i}/dot_general/stats"] == "QuantStats"
        assert paths[f"layers/{i}/dot_general/static"] == "StaticQParams"
        assert f"layers/{i}/dot_general/weight_static" not in paths
    x = normal(rng, 4, 32)
    qjax.nn.calibrate(q, [x])
    stats = q.layers[0].dot_general.stats.get_value()
    assert int(stats["count"]) == x.size
    scale = float(q.layers[0].dot_general.static.get_value()[0])
    assert scale == pytest.approx(float(np.abs(np.asarray(x)).max()) / 127, rel=1e-6)
    served = qjax.nn.convert(q)
    assert all(op.stats is None and op.weight_static is None for _, _, op in qjax.nn.quantized_ops(served))
    assert float(served.layers[0].dot_general.static.get_value()[0]) == scale


@pytest.mark.parametrize(
    ("estimator", "acts"),
    [("lsq", A8_TENSOR), ("pact", A8_TENSOR), ("lsq_plus", QuantSpec(dtype="uint8", symmetric=False))],
)
def test_learned_activation_quantizers_hold_statistics_for_their_initialisation(estimator, acts):
    rule = Rule(path=".*", weights=W8_CH, activations=acts, activation_estimator=estimator)
    q = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [rule])
    assert all(op.stats is not None and op.static is None for _, _, op in qjax.nn.quantized_ops(q))


def _ema(values, decay):
    m = values[0]
    for v in values[1:]:
        m = decay * m + (1 - decay) * v
    return m


def test_static_activations_use_the_calibrated_range(rng):
    model = Branches(nnx.Rngs(0))
    pct = QuantSpec(dtype="int8", calibration="percentile", percentile=99.0)
    rules = [
        Rule(path="branches/0", activations=A8_TENSOR, observer="minmax", activation_scale="static"),
        Rule(
            path="branches/1",
            activations=A8_TENSOR,
            observer="moving_average",
            ema_decay=0.5,
            activation_scale="static",
        ),
        Rule(
            path="branches/2",
            activations=pct,
            observer="histogram",
            histogram_bins=64,
            activation_scale="static",
        ),
    ]
    q = qjax.nn.quantize_model(model, rules)
    batches = [np.asarray(rng.normal(size=(4, 32)), np.float32) for _ in range(3)]
    batches[0][0, 0] = 10.0  # an outlier in the first batch: the histogram range never grows after it
    qjax.nn.calibrate(q, [jnp.asarray(b) for b in batches])
    a = np.concatenate([b.reshape(-1) for b in batches]).astype(np.float64)
    amax = np.abs(a).max()
    counts, _ = np.histogram(np.abs(a), bins=64, range=(0, amax))
    clip = (np.argmax(np.cumsum(counts) / a.size >= 0.99) + 1) * amax / 64
    assert clip < amax / 2
    lo = [a.min(), _ema([b.min() for b in batches], 0.5), max(a.min(), -clip)]
    hi = [a.max(), _ema([b.max() for b in batches], 0.5), min(a.max(), clip)]
    scales = [max(-lo_, hi_) / 127 for lo_, hi_ in zip(lo, hi, strict=True)]
    x = jnp.asarray(rng.normal(size=(4, 32)) * 3, jnp.float32)  # beyond the calibrated range
    outs = apply(q, x)
    for i, s in enumerate(scales):
        branch = model.branches[i]
        np.testing.assert_allclose(q.branches[i].dot_general.static.get_value()[0], s, rtol=1e-5)
        x_hat = np.clip(np.round(np.array(x, np.float64) / s), -127, 127) * s
        ref = x_hat @ np.array(branch.kernel[...], np.float64) + np.array(branch.bias[...])
        np.testing.assert_allclose(outs[i], ref, rtol=1e-5, atol=1e-5)


# --- learned quantizers: LSQ and PACT ----------------------------------------------------------

LEARNED = [
    Rule(
        path="layers/0",
        weights=W4_CH,
        activations=A8_TENSOR,
        weight_estimator="lsq",
        activation_estimator="lsq",
    ),
    Rule(path="layers/1", weights=W8_CH, activations=A8_TENSOR, activation_estimator="pact"),
]


def test_calibrate_initialises_lsq_scale_and_pact_clip(rng):
    mlp = MLP(nnx.Rngs(0))
    q = qjax.nn.quantize_model(mlp, LEARNED)
    batches = [normal(rng, 4, 32) for _ in range(2)]
    qjax.nn.calibrate(q, batches)
    x = np.concatenate([np.array(b) for b in batches]).astype(np.float64)
    h = np.concatenate([np.maximum(np.array(apply(mlp.layers[0], b)), 0) for b in batches])
    learned = qjax.nn.learned_quantizer_params(q)
    np.testing.assert_allclose(
        learned["layers/0"]["act_scale"], 2 * np.abs(x).mean() / math.sqrt(127), rtol=1e-5
    )
    np.testing.assert_allclose(learned["layers/1"]["act_clip"], h.max(), rtol=1e-6)
    assert set(learned["layers/0"]) == {"weight_scale", "act_scale"} and set(learned["layers/1"]) == {
        "act_clip"
    }


def _loss(model, x, y):
    return jnp.mean(jnp.square(model(x) - y))


@nnx.jit
def _train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


def test_gradients_reach_learned_quantizers_and_adam_moves_them(rng):
    q = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), LEARNED)
    qjax.nn.calibrate(q, [normal(rng, 4, 32)])
    x, y = normal(rng, 8, 32, scale=3.0), normal(rng, 8, 16)  # larger than calibration: some x > clip
    grads = nnx.jit(nnx.grad(_loss))(q, x, y)
    flat = {path: v[...] for path, v in nnx.to_flat_state(grads)}
    for path in [("layers", 0, "dot_general", n) for n in ("weight_scale", "act_scale")] + [
        ("layers", 1, "dot_general", "act_clip")
    ]:
        assert np.all(np.isfinite(flat[path])) and np.any(flat[path] != 0), path
    before = jax.tree.map(np.array, qjax.nn.learned_quantizer_params(q))
    stats = [np.array(a) for a in jax.tree.leaves(nnx.state(q, QuantStats))]
    optimizer = nnx.Optimizer(q, optax.adam(1e-2), wrt=nnx.Param)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction computes float ** int32
        for _ in range(3):
            _train_step(q, optimizer, x, y)
    after = qjax.nn.learned_quantizer_params(q)
    for path, params in before.items():
        for name, value in params.items():
            assert np.max(np.abs(np.array(after[path][name]) - value)) > 1e-4, (path, name)
    for s0, s1 in zip(stats, jax.tree.leaves(nnx.state(q, QuantStats)), strict=True):
        np.testing.assert_array_equal(s0, s1)  # optax never touches the statistics


def test_lsq_kernel_gradient_is_masked_outside_the_range(rng):
    mlp = MLP(nnx.Rngs(0))
    mlp.layers[0].kernel[...] = mlp.layers[0].kernel[...].at[:3].multiply(30.0)  # outliers
    q = qjax.nn.quantize_model(mlp, [Rule(path="layers/0", weights=W4_CH, weight_estimator="lsq")])
    x, c = normal(rng, 4, 32), normal(rng, 4, 16)
    w = np.array(mlp.layers[0].kernel[...], np.float64)
    s = np.array(q.layers[0].dot_general.weight_scale[...], np.float64)
    assert s.shape == (1, 32)
    w_hat = jnp.asarray(np.clip(np.round(w / s), -7, 7) * s, jnp.float32)
    (b0, w1, b1) = (mlp.layers[0].bias[...], mlp.layers[1].kernel[...], mlp.layers[1].bias[...])
    ref_loss = lambda k: jnp.sum((jax.nn.relu(x @ k + b0[None]) @ w1 + b1[None]) * c)
    inside = np.abs(w / s) < 7
    assert inside.any() and not inside.all()
    expected = np.where(inside, np.array(jax.jit(jax.grad(ref_loss))(w_hat)), 0.0)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * c)))(q)
    np.testing.assert_allclose(grads["layers"][0]["kernel"][...], expected, rtol=1e-5, atol=1e-5)


# --- errors name the layer ---------------------------------------------------------------------


def test_group_size_not_dividing_the_contraction_dim():
    w = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=5)
    with pytest.raises(
        ValueError, match=r"layer 'layers/0' \(kernel \(32, 32\)\).*group_size=5 does not divide"
    ):
        qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [Rule(path=".*", weights=w)])


def test_quantizing_a_quantized_model_is_refused():
    q = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [Rule(path=".*", weights=W8_CH)])
    with pytest.raises(ValueError, match=r"layer 'layers/0' is already quantized"):
        qjax.nn.quantize_model(q, [Rule(path=".*", weights=W8_CH)])


def test_serving_before_convert_is_refused(rng):
    mlp, lm = MLP(nnx.Rngs(0)), TinyLM(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mode='serve' is not one of .*use mode='convert'"):
        qjax.nn.quantize_model(mlp, [Rule(path=".*", weights=W8_CH)], mode="serve")
    q = qjax.nn.quantize_model(mlp, [Rule(path=".*", weights=W8_CH, activations=A8_TOKEN)])
    with pytest.raises(ValueError, match=r"mode='serve' cannot be set in place.*qjax\.nn\.convert"):
        qjax.nn.set_mode(q, "serve")
    update_op(q.layers[0], q.layers[0].dot_general, mode="serve")  # forced past set_mode
    with pytest.raises(ValueError, match=r"layer 'layers/0' is in mode 'serve' but its kernel is float"):
        q(normal(rng, 2, 32))
    qe = qjax.nn.quantize_model(lm, [Rule(path="embed", weights=W8_CH), Rule(path=".*")])
    qe.embed.promote_dtype.mode = "serve"
    with pytest.raises(ValueError, match=r"layer 'embed' is in mode 'serve' but its table is float"):
        qe.embed(jnp.zeros((1, 2), jnp.int32))


def test_converted_models_refuse_mode_changes_and_reconversion():
    served = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [Rule(path=".*", weights=W8_CH)], mode="convert")
    with pytest.raises(ValueError, match=r"layer 'layers/0' is converted \(mode 'serve'\)"):
        qjax.nn.set_mode(served, "qat")
    with pytest.raises(ValueError, match=r"layer 'layers/0' is already converted"):
        qjax.nn.convert(served)


def test_convert_with_static_activations_needs_calibration():
    rule = Rule(path=".*", weights=W8_CH, activations=A8_TENSOR, activation_scale="static")
    q = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [rule])
    with pytest.raises(
        ValueError, match=r"layer 'layers/0' uses static activation scales but has no calibration"
    ):
        qjax.nn.convert(q)


# --- Linen -------------------------------------------------------------------------------------


def test_linen_dense_with_fake_quant_dot_general(rng):
    dg = qjax.nn.FakeQuantDotGeneral(weights=W8_CH, activations=A8_TOKEN)
    dense = linen.Dense(8, dot_general=dg)
    x = np.asarray(rng.normal(size=(4, 32)), np.float32)
    params = dense.init(jax.random.key(0), jnp.asarray(x))
    y = jax.jit(dense.apply)(params, jnp.asarray(x))
    k = np.asarray(params["params"]["kernel"], np.float64)
    sx = np.max(np.abs(x), axis=1, keepdims=True) / 127
    sk = np.max(np.abs(k), axis=0, keepdims=True) / 127
    ref = (np.round(x / sx) * sx) @ (np.round(k / sk) * sk) + np.asarray(params["params"]["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(x @ k - ref)) > 1e-4  # differs from the float dense


def test_linen_rejects_learned_estimators():
    with pytest.raises(
        ValueError, match=r"weight_estimator='lsq': Linen layers hold no learned quantizer state"
    ):
        qjax.nn.FakeQuantDotGeneral(weights=W8_CH, weight_estimator="lsq")
    with pytest.raises(ValueError, match=r"activation_estimator='pact'"):
        qjax.nn.FakeQuantDotGeneral(activations=A8_TENSOR, activation_estimator="pact")
