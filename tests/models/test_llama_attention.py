"""The attention contractions of qjax.models.Llama under a rule of kind='attention': float in
calibrate mode, fake-quantized QK^T and PV in qat against a float64 reference, int8 x int8 served."""

import flax.nnx as nnx
import jax
import numpy as np
import pytest

import qjax
from qjax.models import KVCacheQuant, Llama, set_kv_cache
from qjax.models.llama import TINY, apply_rope, rope_angles
from qjax.nn import Rule
from tests.nn.test_attention import contractions, reference_attention

A8_TOKEN = {"dtype": "int8", "granularity": "per_token"}
ATTENTION = [Rule(path=r"layers/\d+/attn", kind="attention", activations=A8_TOKEN)]


@pytest.fixture(scope="module")
def model_and_tokens():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
    return model, tokens


forward = nnx.jit(lambda m, t: m(t))


def test_calibrate_mode_is_the_default_path_and_the_kv_cache_comes_first(model_and_tokens):
    model, tokens = model_and_tokens
    qmodel = qjax.nn.quantize_model(model, ATTENTION, mode="calibrate")
    assert [path for path, _, _ in qjax.nn.attention_ops(qmodel)] == ["layers/0/attn", "layers/1/attn"]
    assert qjax.nn.quantized_ops(qmodel) == []  # the projections: rules of kind 'layer' only
    want = np.asarray(forward(model, tokens))
    np.testing.assert_allclose(np.asarray(forward(qmodel, tokens)), want, rtol=0, atol=1e-5)
    # the cache is simulated before attention_fn: the op reads the cached keys and values
    cache = KVCacheQuant("int8", "per_head")
    cached, qcached = (set_kv_cache(nnx.clone(m), cache) for m in (model, qmodel))
    want_cached = np.asarray(forward(cached, tokens))
    assert np.abs(want_cached - want).max() > 1e-4
    np.testing.assert_allclose(np.asarray(forward(qcached, tokens)), want_cached, rtol=0, atol=1e-5)


def test_qat_quantizes_qk_and_pv_as_the_float64_reference(model_and_tokens):
    model, _ = model_and_tokens
    qmodel = qjax.nn.quantize_model(model, ATTENTION)
    attn, c = qmodel.layers[0].attn, TINY
    x = jax.random.normal(jax.random.key(2), (2, 16, TINY.dim))  # an attention input
    got = nnx.jit(lambda a, x: a(x))(attn, x)
    b, t, _ = x.shape
    cos, sin = rope_angles(t, c.head_dim, c.rope_theta)
    q = apply_rope(attn.q_proj(x).reshape(b, t, c.n_heads, c.head_dim), cos, sin)
    k = apply_rope(attn.k_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim), cos, sin)
    v = attn.v_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim)
    causal = np.tril(np.ones((t, t), bool))[None, None]
    o = reference_attention(q, k, v, causal).reshape(b, t, -1)
    want = o @ np.asarray(attn.o_proj.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-5 * np.abs(want).max())
    float_out = np.asarray(model.layers[0].attn(x), np.float64)
    assert np.abs(float_out - want).max() > 1e-3 * np.abs(want).max()  # quantization is visible


def test_served_attention_contracts_int8_operands(model_and_tokens):
    model, tokens = model_and_tokens
    qmodel = qjax.nn.quantize_model(model, ATTENTION)
    served = qjax.nn.convert(qmodel)
    np.testing.assert_allclose(
        np.asarray(forward(served, tokens)), np.asarray(forward(qmodel, tokens)), rtol=0, atol=1e-4
    )
    found = contractions(jax.make_jaxpr(lambda t: served(t))(tokens).jaxpr)
    real = [dtypes for _, dtypes, k in found if k > 1]  # extent-1 contractions multiply scale grids
    # per block: q, k, v, o, gate, up, down in float32, QK^T and PV in int8; the tied LM head
    assert real.count(("int8", "int8")) == 2 * TINY.n_layers
    assert len(real) == 9 * TINY.n_layers + 1
    assert all(d in (("int8", "int8"), ("float32", "float32")) for d in real), real


def test_float_modules_and_summary_name_the_attention_contractions(model_and_tokens):
    model, _ = model_and_tokens
    left = {path: reason for path, _, reason in qjax.nn.float_modules(model)}
    assert left["layers/1/attn (QK^T, PV)"] == "attention contractions not quantized"
    qmodel = qjax.nn.quantize_model(model, ATTENTION)
    assert not any("QK^T" in path for path, _, _ in qjax.nn.float_modules(qmodel))
    rows = {row["path"]: row for row in qjax.nn.summary(qmodel)}
    assert rows["layers/0/attn (QK^T, PV)"]["activations"] == "int8"


def test_a_custom_attention_function_is_refused(model_and_tokens):
    model, _ = model_and_tokens
    custom = nnx.clone(model)
    custom.layers[1].attn.attention_fn = lambda q, k, v, **kw: qjax.nn.grouped_query_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match=r"layer 'layers/1/attn' uses its own attention_fn '<lambda>'"):
        qjax.nn.quantize_model(custom, ATTENTION)
    served = qjax.nn.quantize_model(model, ATTENTION)
    with pytest.raises(ValueError, match="already quantized"):
        qjax.nn.quantize_model(served, ATTENTION)
