"""The quantized key / value cache of qjax.models.Llama against float64 references."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import SpecError
from qjax.models import KVCacheQuant, Llama, set_kv_cache
from qjax.models.llama import TINY


def reference_int8(x, axes):
    """float64 symmetric int8 quantize-dequantize, one scale per slice reduced over ``axes``."""
    x = np.asarray(x, np.float64)
    amax = np.max(np.abs(x), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1.0)
    return np.clip(np.round(x / scale), -127, 127) * scale


@pytest.mark.parametrize(("granularity", "axes"), [("per_token", (3,)), ("per_head", (1, 3))])
def test_int8_cache_matches_float64(granularity, axes):
    heads = jnp.arange(1.0, 4.0)[None, None, :, None]  # the heads' ranges differ
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8)) * heads
    got = jax.jit(KVCacheQuant("int8", granularity).apply)(x)
    np.testing.assert_allclose(np.asarray(got, np.float64), reference_int8(x, axes), rtol=0, atol=1e-6)


def test_fp8_cache_keeps_e4m3_values_per_token():
    x = jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
    got = np.asarray(KVCacheQuant("float8_e4m3fn", "per_token").apply(x), np.float64)
    scale = np.max(np.abs(np.asarray(x, np.float64)), axis=-1, keepdims=True) / 448.0
    codes = got / scale  # on the e4m3 grid, exactly representable
    on_grid = np.asarray(jnp.asarray(codes, jnp.float8_e4m3fn), np.float64)
    np.testing.assert_allclose(codes, on_grid, atol=1e-4)
    assert np.max(np.abs(got - np.asarray(x))) <= 0.07 * np.max(np.abs(np.asarray(x)))


def test_llama_with_a_quantized_cache():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, TINY.vocab_size)
    forward = nnx.jit(lambda m, t: m(t))
    base = forward(model, tokens)
    set_kv_cache(model, KVCacheQuant("int8", "per_token"))
    int8 = forward(model, tokens)
    set_kv_cache(model, KVCacheQuant("int8", "per_head"))
    per_head = forward(model, tokens)
    set_kv_cache(model, None)
    np.testing.assert_array_equal(np.asarray(forward(model, tokens)), np.asarray(base))
    for quantized in (int8, per_head):
        err = float(jnp.abs(quantized - base).max())
        assert 0 < err < 0.05 * float(jnp.abs(base).max())
    # the first token attends to itself only: its cached key and value are its own, quantized
    assert float(jnp.abs(int8 - base)[:, 0].max()) > 0


def test_kv_cache_errors():
    with pytest.raises(SpecError, match="per_token"):
        KVCacheQuant("int8", "per_channel")
    with pytest.raises(SpecError, match="integer or float8"):
        KVCacheQuant("nvfp4")
    with pytest.raises(ValueError, match=r"no qjax\.models\.llama\.Attention"):
        set_kv_cache(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), KVCacheQuant())
