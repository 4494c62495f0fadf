"""Hadamard rotations of a Llama: the rotated float model computes the same logits (with each option),
the rotation spreads planted outlier channels, and W4A4 (per-token activations) RTN and an int4 KV
cache are far more accurate on the rotated model; clear refusals.

The model has widths that need Kronecker factors (dim 96 = 12 x 8, hidden 160 = 20 x 8, head 24 =
12 x 2), grouped-query attention, random norm gains, and outlier channels planted without changing
its function: a norm gain times ``F`` with the rows of the linears reading it divided by ``F``
(inputs of q/k/v and gate/up), an ``up_proj`` column times ``F`` with the ``down_proj`` row divided
by ``F`` (input of down_proj), a key pair of channels (``j``, ``j + d_h/2``: the rotary embedding
turns them together) times ``F`` with the queries' divided by ``F``, and a value channel times
``F`` with ``o_proj``'s rows divided by ``F``."""

import dataclasses

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.methods import fuse_norms, outlier_stats, rotate_llama, rotate_weights
from qjax.methods.sequential import capture_inputs
from qjax.models import KVCacheQuant, Llama, LlamaConfig, llama_from_weights, model_weights, set_kv_cache
from qjax.numerics import hadamard, random_hadamard

CONFIG = LlamaConfig(
    vocab_size=128, dim=96, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=64
)
F = 30.0
W4 = qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
A4 = qjax.QuantSpec(dtype="int4", granularity="per_token")


def _abstract(config):
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


def _random_weights(config, rng):
    """Normal(0, 0.02) parameters, as the model's initializers draw its kernels and embedding (norm
    gains too: the caller sets them), without a JAX compilation per shape."""
    params = [(p, n) for p, n in nnx.iter_graph(_abstract(config)) if isinstance(n, nnx.Param)]
    return {
        "/".join(map(str, p)): (0.02 * rng.standard_normal(n.shape)).astype(np.float32) for p, n in params
    }


def _model(seed=0, *, values=True):
    rng = np.random.default_rng(seed)
    w = _random_weights(CONFIG, rng)
    hd, groups = CONFIG.head_dim, CONFIG.kv_groups
    for i in range(CONFIG.n_layers):
        for norm, readers in (
            ("attn_norm", ("attn/q_proj", "attn/k_proj", "attn/v_proj")),
            ("mlp_norm", ("mlp/gate_proj", "mlp/up_proj")),
        ):
            g = rng.uniform(0.5, 2.0, CONFIG.dim)
            g[[5, 60]] *= F
            w[f"layers/{i}/{norm}/weight"] = g.astype(np.float32)
            for name in readers:
                w[f"layers/{i}/{name}/kernel"][[5, 60]] /= F
        w[f"layers/{i}/mlp/up_proj/kernel"][:, [7, 100]] *= F
        w[f"layers/{i}/mlp/down_proj/kernel"][[7, 100]] /= F
        key = [3, 3 + hd // 2]  # KV head 0; its query heads are 0 .. G - 1
        w[f"layers/{i}/attn/k_proj/kernel"][:, key] *= F
        w[f"layers/{i}/attn/q_proj/kernel"][:, [h * hd + j for h in range(groups) for j in key]] /= F
        if values:  # KV head 1, channel 4; its query heads are G .. 2G - 1
            w[f"layers/{i}/attn/v_proj/kernel"][:, hd + 4] *= F
            w[f"layers/{i}/attn/o_proj/kernel"][[h * hd + 4 for h in range(groups, 2 * groups)]] /= F
    w["norm/weight"] = rng.uniform(0.5, 2.0, CONFIG.dim).astype(np.float32)
    return llama_from_weights(CONFIG, w)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _tokens(seed=1, n=4, t=32):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (n, t)), jnp.int32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def planted():
    model = _model()
    tokens = _tokens()
    return model, tokens, np.asarray(_logits(model, tokens))


@pytest.mark.parametrize("online_down, rotate_qk", [(False, False), (True, False), (True, True)])
def test_rotated_model_computes_the_same_logits(planted, online_down, rotate_qk):
    model, tokens, ref = planted
    before = model_weights(model)
    rotated = rotate_llama(model, seed=7, online_down=online_down, rotate_qk=rotate_qk)
    out = np.asarray(_logits(rotated, tokens))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    c = rotated.config
    assert (c.tie_embeddings, c.down_hadamard, c.qk_hadamard) == (False, online_down, rotate_qk)
    weights = model_weights(rotated)
    assert all(np.all(w == 1) for k, w in weights.items() if k.endswith("norm/weight"))
    q = random_hadamard(CONFIG.dim, 7)  # the embedding really is rotated: E Q
    np.testing.assert_allclose(weights["embed/embedding"], before["embed/embedding"] @ q, atol=1e-6)
    after = model_weights(model)  # the model given is left as it was
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_fused_norms_alone_keep_the_logits(planted):
    model, tokens, ref = planted
    weights = model_weights(model)
    config, fused = fuse_norms(CONFIG, weights)
    assert not config.tie_embeddings
    head = weights["norm/weight"][:, None].astype(np.float64) * weights["embed/embedding"].T
    np.testing.assert_array_equal(fused["lm_head/kernel"], head)  # diag(g) E^T
    out = np.asarray(_logits(llama_from_weights(config, fused), tokens))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    with pytest.raises(ValueError, match="call fuse_norms first"):
        rotate_weights(CONFIG, weights, np.eye(CONFIG.dim), online_down=False, rotate_qk=False)
    with pytest.raises(ValueError, match=r"the residual stream needs \(96, 96\)"):
        rotate_weights(config, fused, np.eye(48), online_down=False, rotate_qk=False)


def _inputs(model, tokens, layers):
    with capture_inputs(layers) as captured:
        model(tokens)
    return [outlier_stats(jnp.concatenate(x, axis=0))["max_over_median"] for x in captured]


def test_rotation_spreads_the_planted_outlier_channels(planted):
    model, tokens, _ = planted
    rotated = rotate_llama(model, seed=0)
    block, rblock = model.layers[1], rotated.layers[1]
    q_in, down_in = _inputs(model, tokens, [block.attn.q_proj, block.mlp.down_proj])
    rq_in, rdown_in = _inputs(rotated, tokens, [rblock.attn.q_proj, rblock.mlp.down_proj])
    assert q_in > 20 and down_in > 20  # max / median of the per-channel max |x|
    assert rq_in < q_in / 5 and rdown_in < down_in / 5
    # down_proj's quantizer would see (silu(x W_gate) * (x W_up)) H / sqrt(n): float64 reference
    m = rblock.mlp
    with capture_inputs([m.gate_proj, m.down_proj]) as (x, down):
        rotated(tokens)
    x64 = np.asarray(jnp.concatenate(x, axis=0), np.float64)
    gate, up = (x64 @ np.asarray(lin.kernel[...], np.float64) for lin in (m.gate_proj, m.up_proj))
    n = CONFIG.hidden_dim
    expected = gate / (1 + np.exp(-gate)) * up @ hadamard(n) / np.sqrt(n)
    got = np.asarray(jnp.concatenate(down, axis=0), np.float64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_w4a4_rtn_is_far_more_accurate_on_the_rotated_model():
    """Outliers at the inputs of q/k/v, gate/up and down_proj (not at o_proj's: no rotation here
    reaches the attention output across heads)."""
    model, tokens = _model(values=False), _tokens()
    ref = np.asarray(_logits(model, tokens))
    rules = [qjax.nn.Rule(path="embed|lm_head"), qjax.nn.Rule(path="layers/.*", weights=W4, activations=A4)]
    plain = _rel(_logits(qjax.nn.quantize_model(nnx.clone(model), rules), tokens), ref)
    rotated = _rel(_logits(qjax.nn.quantize_model(rotate_llama(model), rules), tokens), ref)
    assert rotated < 0.5 * plain, (rotated, plain)


def test_rotated_queries_keys_and_values_suit_an_int4_kv_cache(planted):
    model, tokens, ref = planted
    cache = KVCacheQuant("int4", "per_token")
    plain = set_kv_cache(nnx.clone(model), cache)
    rotated = rotate_llama(plain, seed=0, online_down=False, rotate_qk=True)
    assert all(layer.attn.kv_cache == cache for layer in rotated.layers)  # the setting is kept
    plain_error, rotated_error = _rel(_logits(plain, tokens), ref), _rel(_logits(rotated, tokens), ref)
    assert rotated_error < 0.5 * plain_error, (rotated_error, plain_error)


def test_refusals(planted):
    model = planted[0]
    with pytest.raises(TypeError, match=r"rotates a float qjax\.models\.Llama; got Linear"):
        rotate_llama(model.layers[0].attn.q_proj)
    with pytest.raises(TypeError, match=r"seed=1\.5 must be an int"):
        rotate_llama(model, seed=1.5)
    odd = dataclasses.replace(CONFIG, n_layers=1)
    rotated = dataclasses.replace(odd, tie_embeddings=False, down_hadamard=True)
    with pytest.raises(ValueError, match="already has online rotations"):
        rotate_llama(_abstract(rotated))
    rules = [qjax.nn.Rule(path="layers/.*", weights=W4)]
    quantized = qjax.nn.quantize_model(
        llama_from_weights(odd, _random_weights(odd, np.random.default_rng(0))), rules
    )
    with pytest.raises(ValueError, match=r"has 7 quantized layers .*rotate the float model"):
        rotate_llama(quantized)
    for config, kwargs, message in [
        (dataclasses.replace(odd, dim=52, n_heads=2), {}, r"dim=52 cannot be rotated: no Hadamard"),
        (
            dataclasses.replace(odd, hidden_dim=52),
            {},
            r"hidden_dim=52 cannot be rotated or online_down=False",
        ),
        (
            dataclasses.replace(odd, dim=48, n_heads=8),
            {"rotate_qk": True},
            r"head_dim=6 cannot be rotated or",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            rotate_llama(_abstract(config), **kwargs)
