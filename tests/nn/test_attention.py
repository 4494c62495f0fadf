"""Attention: every contraction of a ViT-style NNX model quantized, QAT to serving; the attention
contractions (QK^T, PV) against a float64 reference of their quantized math."""

import logging

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax import QuantSpec, SpecError
from qjax.nn import QuantizedAttention, Rule

A8_TOKEN = {"dtype": "int8", "granularity": "per_token"}
W8_CH = {"dtype": "int8", "granularity": "per_channel", "axis": -1}


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class ViT(nnx.Module):
    """4x4 patches of a 16x16 image, a block of width 32 with 4 heads, mean-pooled head."""

    def __init__(self, rngs: nnx.Rngs, d: int = 32):
        self.patch = nnx.Conv(1, d, (4, 4), strides=(4, 4), rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, 16, d)) * 0.02)
        self.blocks = nnx.List([Block(d, 4, rngs)])
        self.head = nnx.Linear(d, 10, rngs=rngs)

    def __call__(self, x):
        x = self.patch(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


VIT_RULES = [
    Rule(path=".*attn", kind="attention", activations=A8_TOKEN),
    Rule(path="patch", weights=W8_CH, activations={"dtype": "int8"}),  # a conv: one input scale
    Rule(path=".*", weights=W8_CH, activations=A8_TOKEN),
]


def contractions(jaxpr):
    """Every dot_general and convolution of a jaxpr (nested jaxprs included): (primitive, operand
    dtypes, contracted extent)."""
    out = []
    for eqn in jaxpr.eqns:
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            out += contractions(sub)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                out += contractions(inner)
            elif hasattr(param, "eqns"):
                out += contractions(param)
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            shape = eqn.invars[0].aval.shape
            k = int(np.prod([shape[a] for a in lc])) if lc else 1
            out.append(("dot_general", tuple(str(v.aval.dtype) for v in eqn.invars), k))
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out.append(("conv", tuple(str(v.aval.dtype) for v in eqn.invars), int(np.prod(rhs[:-1]))))
    return out


@pytest.fixture(scope="module")
def vit_trained():
    """The float ViT, and its quantized copy after 3 QAT steps of a user's own optax loop."""
    model = ViT(nnx.Rngs(0))
    qmodel = qjax.nn.quantize_model(model, VIT_RULES)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 1))
    labels = jnp.arange(8) % 10
    optimizer = nnx.Optimizer(qmodel, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, labels):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
            optimizer.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(3):
        loss, grads = step(qmodel, optimizer, x, labels)
        losses.append(float(loss))
    return model, qmodel, x, losses, grads


def test_vit_every_contraction_quantized_qat_to_serve(vit_trained):
    model, qmodel, x, losses, grads = vit_trained
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # the projections' gradients flow through the fake-quantized attention
    assert float(jnp.abs(grads["blocks"][0]["attn"]["query"]["kernel"][...]).max()) > 0
    rows = {row["path"]: row for row in qjax.nn.summary(qmodel)}
    assert rows["blocks/0/attn (QK^T, PV)"]["activations"] == "int8"
    for name in ("query", "key", "value", "out"):
        assert rows[f"blocks/0/attn/{name}"]["layer"] == "LinearGeneral"
        assert rows[f"blocks/0/attn/{name}"]["weights"] == "int8"
    # nothing left in float but the norms and the position embedding (an addition)
    left = {path: kind for path, kind, _ in qjax.nn.float_modules(qmodel)}
    assert left == {"blocks/0/ln1": "LayerNorm", "blocks/0/ln2": "LayerNorm", "(root)": "ViT"}

    fake = nnx.jit(lambda m, x: m(x))(qmodel, x)
    served = qjax.nn.convert(qmodel)
    out = nnx.jit(lambda m, x: m(x))(served, x)
    float_out = model(x)
    # serving computes the fake-quantized network up to float rounding: every example's logits agree
    # to 1e-4 but at most one, where an activation on a rounding boundary flips its code (the two
    # programs fuse the float ops before it differently); quantization moves the logits far more
    per_example = np.abs(np.asarray(out - fake)).max(axis=1)
    quantization = float(jnp.abs(fake - float_out).max())
    assert np.sum(per_example > 1e-4 * float(jnp.abs(fake).max())) <= 1
    assert per_example.max() < 0.02 * quantization and quantization > 1e-3

    found = contractions(jax.make_jaxpr(lambda x: served(x))(x).jaxpr)
    real = [c for c in found if c[2] > 1]  # extent-1 contractions multiply scale grids
    # 4 projections + QK^T + PV + 2 MLP + head + patch conv
    assert len(real) == 8 + 2, found
    for name, dtypes, _ in real:
        assert dtypes == ("int8", "int8"), (name, dtypes)


def test_float_layers_warning_names_attention_and_reason(caplog):
    model = ViT(nnx.Rngs(0))
    with caplog.at_level(logging.WARNING, logger="qjax"):
        qjax.nn.quantize_model(model, [Rule(path=".*(up|down)", weights=W8_CH)])
    text = caplog.text
    assert "blocks/0/attn/query (LinearGeneral): no rule matched" in text
    assert "blocks/0/attn (QK^T, PV) (MultiHeadAttention): no rule of kind='attention' matched" in text
    assert "blocks/0/ln1 (LayerNorm): normalization" in text
    assert "patch (Conv): no rule matched" in text


# --- the attention contractions against float64 ------------------------------------------------


def _quantize_rows(x, axis, bits=8):
    """Symmetric int quantization of float64 ``x``, one scale per slice along ``axis`` (``None``: one
    scale for the whole tensor)."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.max(np.abs(x), axis=axis, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(x / scale), -qmax, qmax) * scale


def reference_attention(q, k, v, mask, per_token=True):
    """float64 quantized attention: q (B,T,H,D), k/v (B,S,H_kv,D), query head h reading key/value
    head h // (H/H_kv); int8 operands with per-token (or per-tensor) scales."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # a repeat keeps every range
    rows = lambda axis: axis if per_token else None
    qh, kh = _quantize_rows(q, rows(-1)), _quantize_rows(k, rows(-1))
    logits = np.einsum("bthd,bshd->bhts", qh, kh) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    ph = _quantize_rows(p, rows(-1))  # one scale per (b, h, t)
    vh = _quantize_rows(v, rows(1))  # one scale per (b, h, d): constant along the contracted tokens
    return np.einsum("bhts,bshd->bthd", ph, vh)


@pytest.mark.parametrize(
    ("mode", "granularity", "kv_heads"),
    [
        ("qat", "per_token", 3),
        ("serve", "per_token", 3),
        ("serve", "per_token", 1),  # grouped-query: 3 query heads read each key/value head
        ("serve", "per_tensor", 1),
    ],
)
def test_attention_contractions_match_float64_reference(mode, granularity, kv_heads):
    keys = jax.random.split(jax.random.key(3), 3)
    shapes = ((2, 6, 3, 8), (2, 6, kv_heads, 8), (2, 6, kv_heads, 8))
    q, k, v = (
        jax.random.normal(key, shape) * s for key, shape, s in zip(keys, shapes, (1.0, 2.0, 0.5), strict=True)
    )
    mask = np.tril(np.ones((6, 6), bool))[None, None]
    spec = {"dtype": "int8", "granularity": granularity}
    op = QuantizedAttention("attn", Rule(path="attn", kind="attention", activations=spec), mode)
    out = jax.jit(lambda q, k, v: op(q, k, v, mask=jnp.asarray(mask), deterministic=True))(q, k, v)
    ref = reference_attention(q, k, v, mask, per_token=granularity == "per_token")
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-5 * np.abs(ref).max())


def test_attention_in_float_matches_flax():
    """In calibrate mode the op computes Flax's attention (mask, bias, causal; 4 query heads reading
    2 key/value heads) in float, and so does qjax.nn.grouped_query_attention."""
    keys = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(keys[0], (2, 5, 4, 4))
    k, v = (jax.random.normal(key, (2, 5, 2, 4)) for key in keys[1:3])
    bias = jax.random.normal(keys[3], (2, 4, 5, 5))
    mask = np.random.default_rng(0).random((2, 1, 5, 5)) > 0.3
    mask = jnp.asarray(mask | np.eye(5, dtype=bool)[None, None])
    op = QuantizedAttention("a", Rule(path="a", kind="attention", activations=A8_TOKEN), "calibrate")
    static = ("deterministic", "is_causal")
    flax_attention = jax.jit(nnx.dot_product_attention, static_argnames=static)
    ours = [jax.jit(f, static_argnames=static) for f in (op, qjax.nn.grouped_query_attention)]
    for kwargs in (dict(bias=bias, mask=mask), dict(is_causal=True)):
        want = flax_attention(q, k, v, deterministic=True, **kwargs)
        for f in ours:
            got = f(q, k, v, deterministic=True, **kwargs)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_fp8_attention_serves_fp8_contractions():
    layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
    fp8 = {"dtype": "float8_e4m3fn", "granularity": "per_token"}
    q = qjax.nn.quantize_model(layer, [Rule(path=".*", kind="attention", activations=fp8)])
    x = jax.random.normal(jax.random.key(0), (2, 4, 8))
    served = qjax.nn.convert(q)
    forward = nnx.jit(lambda m, x: m(x))
    want = np.asarray(forward(q, x))
    np.testing.assert_allclose(np.asarray(forward(served, x)), want, rtol=1e-4, atol=1e-5)
    real = [c for c in contractions(jax.make_jaxpr(lambda x: served(x))(x).jaxpr) if c[2] > 1]
    attention = [dtypes for _, dtypes, _ in real if dtypes[0].startswith("float8")]
    assert len(attention) == 2 and all(d == ("float8_e4m3fn", "float8_e4m3fn") for d in attention)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "match"),
    [
        (dict(weights=W8_CH, activations=A8_TOKEN), "weights", "no weights"),
        (dict(activations=W8_CH), "activations", "per_token"),
        (dict(activations={"dtype": "int8"}, activation_scale="static"), "activation_scale", "dynamic"),
        (dict(activations={"dtype": "int8"}, activation_estimator="lsq"), "activation_estimator", "ste"),
        (dict(activations={"dtype": "mxfp8", "granularity": "per_group", "axis": -1}), "activations", "fp8"),
        (dict(activations={"dtype": "int8", "rounding": "stochastic"}), "activations", "'nearest'"),
    ],
)
def test_attention_rule_errors(fields, field, match):
    with pytest.raises(SpecError, match=match) as info:
        Rule(path=".*", kind="attention", **fields)
    assert info.value.field == field


def test_custom_attention_fn_is_refused():
    mine = lambda q, k, v, **kw: nnx.dot_product_attention(q, k, v, **kw)
    layer = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, attention_fn=mine, decode=False, rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="uses its own attention_fn"):
        qjax.nn.quantize_model(layer, [Rule(path=".*", kind="attention", activations=A8_TOKEN)])


def test_layer_rules_never_match_attention_and_vice_versa():
    layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
    only_attention = qjax.nn.quantize_model(layer, [Rule(path=".*", kind="attention", activations=A8_TOKEN)])
    assert qjax.nn.quantized_ops(only_attention) == []
    assert len(qjax.nn.attention_ops(only_attention)) == 1
    only_layers = qjax.nn.quantize_model(layer, [Rule(path=".*", weights=QuantSpec(dtype="int8"))])
    assert len(qjax.nn.quantized_ops(only_layers)) == 4 and qjax.nn.attention_ops(only_layers) == []
