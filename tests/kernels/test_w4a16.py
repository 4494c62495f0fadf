"""W4A16 Pallas kernel: packing round trip, interpret-mode kernels vs the reference, the reference vs
float64 numpy, cross-platform lowering (cuda, tpu) on CPU, pytree behaviour and input validation.
The options of the GPU body (``swap_ab``, the unpacks): ``tests/kernels/experimental/
test_w4a16_variants.py``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.w4a16 import (
    PackedW4,
    pack_w4,
    unpack_w4,
    w4a16_matmul,
    w4a16_matmul_reference,
)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1.6e-2, jnp.float16: 2e-3}


def make_weight(rng, k, n, g, asym):
    """Codes, scales, zeros (numpy) and their PackedW4."""
    q = rng.integers(0, 16, (k, n)) if asym else rng.integers(-8, 8, (k, n))
    s = rng.uniform(0.01, 0.1, (k // g, n)).astype(np.float32)
    z = rng.integers(0, 16, (k // g, n)).astype(np.float32) if asym else None
    w = pack_w4(
        jnp.asarray(q, jnp.int32), jnp.asarray(s), None if z is None else jnp.asarray(z), group_size=g
    )
    return q, s, z, w


def dequant64(q, s, z, g):
    zz = 0.0 if z is None else np.repeat(z.astype(np.float64), g, axis=0)
    return (q.astype(np.float64) - zz) * np.repeat(s.astype(np.float64), g, axis=0)


def assert_close(y, ref, dtype):
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    tol = TOL[dtype]
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), g=st.sampled_from([32, 64, 128]), asym=st.booleans())
def test_pack_unpack_round_trip_exact(seed, g, asym):
    rng = np.random.default_rng(seed)
    k, n = 2 * g + (128 if g == 32 else 0), 37
    q, s, z, w = make_weight(rng, k, n, g, asym)
    deq = np.asarray(unpack_w4(w))
    assert deq.dtype == np.float32 and deq.shape == (k, n)
    np.testing.assert_array_equal(deq, dequant64(q, s, z, g).astype(np.float32))
    k_pad = -(-k // max(128, g)) * max(128, g)
    assert w.packed.dtype == jnp.uint8 and w.packed.shape == (k_pad // 2, 128)
    assert w.scales.shape == (k_pad // g, 128) and w.scales.dtype == jnp.float32
    assert (w.zeros is None) == (not asym)


def test_packing_layout_is_documented_one():
    """Group j, packed row j*g/2 + r: low nibble = row j*g + r, high nibble = row j*g + g/2 + r."""
    g, k = 32, 128
    q = (np.arange(k)[:, None] % 16 + np.zeros((1, 3), np.int64)).astype(np.int32)  # row k holds k % 16
    w = pack_w4(
        jnp.asarray(q), jnp.ones((k // g, 3), jnp.float32), jnp.zeros((k // g, 3), jnp.float32), group_size=g
    )
    p = np.asarray(w.packed)[:, 0].astype(np.int64)
    for j in range(k // g):
        for r in range(g // 2):
            assert p[j * g // 2 + r] & 0xF == (j * g + r) % 16
            assert p[j * g // 2 + r] >> 4 == (j * g + g // 2 + r) % 16
    sym = pack_w4(jnp.full((k, 3), -8, jnp.int32), jnp.ones((k // g, 3), jnp.float32), group_size=g)
    assert int(sym.packed[0, 0]) == 0  # excess-8: -8 is nibble 0


CASES = [  # (m, k, n, g, asym, dtype, bias)
    (1, 256, 100, 128, False, jnp.float32, False),
    (1, 192, 100, 64, True, jnp.bfloat16, True),
    (5, 96, 40, 32, True, jnp.float16, True),
    (17, 256, 130, 32, False, jnp.bfloat16, False),
    (40, 192, 256, 64, False, jnp.float32, True),
    (3, 384, 64, 128, True, jnp.float32, False),
]


@pytest.mark.parametrize(("m", "k", "n", "g", "asym", "dtype", "bias"), CASES)
def test_interpret_matches_reference(m, k, n, g, asym, dtype, bias):
    rng = np.random.default_rng(m * k + n)
    _, _, _, w = make_weight(rng, k, n, g, asym)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    b = jnp.asarray(rng.normal(size=(n,)), jnp.float32) if bias else None
    y = jax.jit(functools.partial(w4a16_matmul, backend="interpret"))(x, w, bias=b)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, w4a16_matmul_reference(x, w, bias=b), dtype)


@pytest.mark.parametrize(
    ("kernel", "split_k", "asym"),
    [("gpu", 2, True), ("gpu", 4, False), ("tpu", None, True), ("tpu", None, False)],
)
def test_kernel_variants_interpret(kernel, split_k, asym):
    """Split K (GPU body) and the TPU body, both run by the interpreter, against the reference."""
    rng = np.random.default_rng(7)
    k, n, g = 512, 200, 64
    _, _, _, w = make_weight(rng, k, n, g, asym)
    x = jnp.asarray(rng.normal(size=(9, k)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    f = functools.partial(
        w4a16_matmul, out_dtype=jnp.float32, backend="interpret", split_k=split_k, body=kernel
    )
    y = jax.jit(f)(x, w, bias=b)
    assert y.dtype == jnp.float32
    ref = w4a16_matmul_reference(x, w, bias=b, out_dtype=jnp.float32)
    # the TPU body rounds the dequantized weight to bf16; the GPU body only the activations
    assert_close(y, ref, jnp.bfloat16 if kernel == "tpu" else jnp.float32)


@pytest.mark.parametrize("split_k", [2, 3])
def test_uneven_k_split_interpret(split_k):
    """5 K steps in 2 ranges (3 + 2, one masked repeat) or 3 ranges (2 + 2 + 1): same as the reference."""
    rng = np.random.default_rng(11)
    k, n, g = 640, 130, 64
    _, _, _, w = make_weight(rng, k, n, g, True)
    x = jnp.asarray(rng.normal(size=(3, k)), jnp.float32)
    f = functools.partial(w4a16_matmul, out_dtype=jnp.float32, backend="interpret", split_k=split_k)
    assert_close(jax.jit(f)(x, w), w4a16_matmul_reference(x, w, out_dtype=jnp.float32), jnp.float32)


def test_auto_split_reaches_the_target_with_short_last_range():
    from qjax.kernels.launch import GPU_TARGET_PROGRAMS, split_k_ranges

    for programs, steps in [(32, 43), (32, 86), (1, 64), (512, 8), (96, 32), (4, 3)]:
        split, per = split_k_ranges(programs, steps)
        assert per == -(-steps // split)
        assert 1 <= split <= steps and (split - 1) * per < steps <= split * per
        assert per >= 2 or steps < 4
        if programs * 2 <= GPU_TARGET_PROGRAMS and steps >= 4:
            assert programs * split >= GPU_TARGET_PROGRAMS // 2 or per == 2


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_interpret_values_hypothesis(seed, scale):
    rng = np.random.default_rng(seed)
    _, _, _, w = make_weight(rng, 128, 48, 32, bool(seed % 2))
    x = jnp.asarray(scale * rng.normal(size=(4, 128)), jnp.float32)
    y = _jitted_interpret(x, w)
    assert_close(y, w4a16_matmul_reference(x, w), jnp.float32)


_jitted_interpret = jax.jit(functools.partial(w4a16_matmul, backend="interpret"))


@pytest.mark.parametrize("asym", [False, True])
def test_reference_matches_float64_numpy(asym):
    rng = np.random.default_rng(3)
    q, s, z, w = make_weight(rng, 192, 70, 64, asym)
    x = rng.normal(size=(6, 192)).astype(np.float32)
    b = rng.normal(size=(70,)).astype(np.float32)
    expect = x.astype(np.float64) @ dequant64(q, s, z, 64) + b
    y = w4a16_matmul_reference(jnp.asarray(x), w, bias=jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())


@pytest.mark.parametrize(("backend", "platform"), [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("m", [1, 256])
@pytest.mark.parametrize("asym", [False, True])
def test_lowers_for_accelerators(backend, platform, m, asym, lowered):
    _, _, _, w = make_weight(np.random.default_rng(0), 512, 384, 128, asym)
    x = jnp.zeros((m, 512), jnp.bfloat16)
    f = jax.jit(functools.partial(w4a16_matmul, backend=backend))
    text = lowered(f, x, w, bias=jnp.zeros((384,), jnp.float32), platform=platform)
    assert ("triton" in text.lower()) if backend == "gpu" else ("tpu_custom_call" in text)


def test_packed_is_a_pytree_with_static_shape_fields():
    _, _, _, w = make_weight(np.random.default_rng(1), 64, 16, 32, True)
    leaves, treedef = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 3
    w2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(w2, PackedW4) and (w2.k, w2.n, w2.group_size) == (64, 16, 32)
    assert jax.jit(lambda w: unpack_w4(w).shape)(w) == (64, 16)
    sym = pack_w4(jnp.zeros((64, 16), jnp.int8), jnp.ones((2, 16), jnp.float32), group_size=32)
    assert len(jax.tree_util.tree_leaves(sym)) == 2


def test_validation_errors():
    q, s = jnp.zeros((96, 8), jnp.int32), jnp.ones((3, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"group_size=64 does not divide K=96"):
        pack_w4(q, jnp.ones((1, 8), jnp.float32), group_size=64)
    with pytest.raises(ValueError, match=r"group_size=48: expected a power of two"):
        pack_w4(q, jnp.ones((2, 8), jnp.float32), group_size=48)
    with pytest.raises(ValueError, match=r"K=95 is odd"):
        pack_w4(jnp.zeros((95, 8), jnp.int32), s, group_size=32)
    with pytest.raises(ValueError, match=r"q: expected a 2-D integer"):
        pack_w4(jnp.zeros((96, 8), jnp.float32), s, group_size=32)
    with pytest.raises(ValueError, match=r"scales: expected shape \(K // group_size, N\) = \(3, 8\)"):
        pack_w4(q, jnp.ones((3, 9), jnp.float32), group_size=32)
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        pack_w4(q.at[0, 0].set(8), s, group_size=32)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_w4(q.at[0, 0].set(-1), s, jnp.zeros((3, 8), jnp.float32), group_size=32)
    with pytest.raises(ValueError, match=r"zeros: expected integer zero points in \[0, 15\]"):
        pack_w4(q, s, jnp.full((3, 8), 0.5, jnp.float32), group_size=32)
    w = pack_w4(q, s, group_size=32)
    with pytest.raises(ValueError, match=r"x: expected shape \(M, K=96\)"):
        w4a16_matmul(jnp.zeros((2, 64), jnp.float32), w, backend="interpret")
    with pytest.raises(ValueError, match=r"x: dtype int8 is not one of"):
        w4a16_matmul(jnp.zeros((2, 96), jnp.int8), w, backend="interpret")
    with pytest.raises(ValueError, match=r"bias: expected shape \(N,\) = \(8,\)"):
        w4a16_matmul(
            jnp.zeros((2, 96), jnp.float32), w, bias=jnp.zeros((9,), jnp.float32), backend="interpret"
        )
    with pytest.raises(ValueError, match=r"split_k=5: must be between 1 and the 1 K steps"):
        w4a16_matmul(jnp.zeros((2, 96), jnp.float32), w, backend="interpret", split_k=5)
    with pytest.raises(TypeError, match=r"w: expected a PackedW4"):
        w4a16_matmul(jnp.zeros((2, 96), jnp.float32), (q, s), backend="interpret")  # type: ignore[arg-type]


def test_jit_traced_pack_skips_value_checks():
    """Under jit code values cannot be checked: packing works and out-of-range codes are truncated."""
    pack = jax.jit(functools.partial(pack_w4, group_size=32))
    w = pack(jnp.full((32, 4), 3, jnp.int32), jnp.ones((1, 4), jnp.float32))
    np.testing.assert_array_equal(np.asarray(unpack_w4(w)), np.full((32, 4), 3.0, np.float32))
