"""The Hopper W4A16 kernel for small M (``qjax.kernels.experimental.hopper_w4``: Pallas on Mosaic GPU).

Pallas' GPU interpreter of jax >= 0.11 runs it (the converted weight staged through shared memory,
since the interpreter's ``wgmma`` takes no register operand) against a float64 evaluation and the
pure-jnp reference, over signed and asymmetric weights, groups of 64 and 128, M = 1..33, N off the
128-column tile, split and unsplit K; jax 0.10's interpreter cannot run it (there the refusal is
checked). Both variants, the register one that a GPU runs and the staged one, lower for ``cuda``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.experimental import hopper, hopper_w4
from qjax.kernels.experimental.hopper_w4 import HopperW4, HopperW4Config, prepare_w4, w4a16_matmul_hopper
from qjax.kernels.w4a16 import pack_w4, w4a16_matmul_reference


def make(rng, m, k, n, g, asym, dtype):
    q = rng.integers(0, 16, (k, n)) if asym else rng.integers(-8, 8, (k, n))
    s = rng.uniform(0.01, 0.1, (k // g, n)).astype(np.float32)
    z = rng.integers(0, 16, (k // g, n)).astype(np.float32) if asym else None
    w = pack_w4(
        jnp.asarray(q, jnp.int32), jnp.asarray(s), None if z is None else jnp.asarray(z), group_size=g
    )
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    wd = (q - (0 if z is None else np.repeat(z, g, 0))) * np.repeat(s.astype(np.float64), g, 0)
    return x, w, wd


# (M, K, N, group, asymmetric, activations, K ranges): N off the 128-column CTA tile, K padded to 8
# slices (zeros), several slices per range, automatic splitting.
CASES = [
    (1, 256, 256, 128, False, jnp.bfloat16, 1),
    (5, 384, 200, 64, True, jnp.bfloat16, 2),
    (16, 512, 130, 128, True, jnp.float16, 4),
    (33, 256, 300, 64, False, jnp.bfloat16, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_interpreted_matches_float64(case, seed):
    m, k, n, g, asym, dtype, splits = case
    rng = np.random.default_rng(seed)
    x, w, wd = make(rng, m, k, n, g, asym, dtype)
    bias = jnp.asarray(rng.normal(size=n), jnp.float32)
    call = functools.partial(
        w4a16_matmul_hopper, out_dtype=jnp.float32, config=HopperW4Config(splits=splits), interpret=True
    )
    if not hopper.INTERPRETS_8BIT:
        with pytest.raises(NotImplementedError, match=r"use jax >= 0\.11"):
            call(x, prepare_w4(w), bias=bias)
        return
    y = np.asarray(call(x, prepare_w4(w), bias=bias))
    assert y.shape == (m, n)
    x64 = np.asarray(x, np.float64)
    expect = x64 @ wd + np.asarray(bias, np.float64)
    # float32 accumulation within each group (g terms), then one scaled sum per group and range
    bound = (g + k // g + 8) * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(wd) + np.abs(bias))
    np.testing.assert_array_less(np.abs(y - expect), bound + 1e-30)
    ref = np.asarray(w4a16_matmul_reference(x, w, bias=bias, out_dtype=jnp.float32))
    np.testing.assert_array_less(np.abs(y - ref), 2 * bound + 1e-30)


def test_prepared_layout():
    """Codes q - 8 transposed to (N, K) int4, zero points z - 8, padded columns adding nothing."""
    rng = np.random.default_rng(0)
    k, n, g = 128, 70, 64
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(0, 16, (k // g, n)).astype(np.float32)
    w = pack_w4(jnp.asarray(q), jnp.ones((k // g, n), jnp.float32), jnp.asarray(z), group_size=g)
    h = prepare_w4(w)
    assert h.codes.dtype == jnp.int4 and h.codes.shape == (128, 8 * g)  # K padded to 8 groups
    assert h.scales.shape == h.zeros.shape == (8, 128)
    np.testing.assert_array_equal(np.asarray(h.codes, np.int32)[:n, :k], (q - 8).T)
    np.testing.assert_array_equal(np.asarray(h.zeros)[: k // g, :n], z - 8)
    assert not np.asarray(h.scales)[:, n:].any()  # padded columns: scale 0
    sym = prepare_w4(pack_w4(jnp.asarray(q - 8), jnp.ones((k // g, n), jnp.float32), group_size=g))
    assert sym.zeros is None
    np.testing.assert_array_equal(np.asarray(sym.codes, np.int32)[:n, :k], (q - 8).T)
    leaves, treedef = jax.tree_util.tree_flatten(h)
    assert len(leaves) == 3 and isinstance(jax.tree_util.tree_unflatten(treedef, leaves), HopperW4)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("a_in_smem", [False, True])
def test_lowers_for_cuda(asym, m, a_in_smem, lowered):
    k = n = 4096
    zeros = jnp.zeros((k // 128, n), jnp.float32) if asym else None
    w = prepare_w4(
        pack_w4(jnp.zeros((k, n), jnp.int32), jnp.ones((k // 128, n), jnp.float32), zeros, group_size=128)
    )
    dtype = jnp.float16 if asym and m == 64 else jnp.bfloat16
    f = jax.jit(functools.partial(w4a16_matmul_hopper, config=HopperW4Config(a_in_smem=a_in_smem)))
    assert "mosaic_gpu" in lowered(f, jnp.zeros((m, k), dtype), w, platform="cuda")


def test_splits_default_to_two_waves():
    assert hopper_w4.choose_splits(96, 32, None) == 4  # 7b.qkv: 96 CTAs of 128 columns, 32 slices of 128
    assert hopper_w4.choose_splits(32, 88, None) == 11  # 7b.down: 86 slices padded to 88
    assert hopper_w4.choose_splits(64, 224, None) == 7  # 70b.down
    assert hopper_w4.choose_splits(448, 64, None) == 1  # 70b.gate_up: already > 2 waves
    assert hopper_w4.choose_splits(1, 8, None) == 8  # never more ranges than slices
    assert hopper_w4.choose_splits(1, 8, 2) == 2


def test_stages_fit_shared_memory():
    """As many K slices in flight as fit in sm_90's 227 KiB: 8 at decode sizes, fewer at M = 128 (32 KiB
    of bf16 activations per 128-row slice); an explicit config that does not fit is refused."""
    cfg = HopperW4Config()
    assert hopper_w4.choose_stages(cfg, 32, 16, 128, 2, True) == 8
    assert hopper_w4.choose_stages(cfg, 32, 128, 128, 2, True) == 3
    for mp, asym in [(16, False), (64, True), (128, True)]:
        stages = hopper_w4.choose_stages(cfg, 32, mp, 128, 2, asym)
        assert hopper_w4.smem_bytes(mp, 128, 2, asym, stages, False) <= hopper.SMEM_BYTES - 1024
    with pytest.raises(ValueError, match=r"more than the 232448 of an sm_90 CTA; lower max_concurrent_steps"):
        hopper_w4.choose_stages(HopperW4Config(max_concurrent_steps=8), 32, 128, 128, 2, True)


def test_refuses_bad_inputs():
    rng = np.random.default_rng(1)
    x, w, _ = make(rng, 2, 256, 128, 128, False, jnp.bfloat16)
    h = prepare_w4(w)
    with pytest.raises(ValueError, match=r"group_size=32: the Hopper W4A16 kernel"):
        prepare_w4(pack_w4(jnp.zeros((256, 8), jnp.int32), jnp.ones((8, 8), jnp.float32), group_size=32))
    with pytest.raises(TypeError, match=r"w: expected a PackedW4"):
        prepare_w4(h)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"w: expected a HopperW4 from prepare_w4"):
        w4a16_matmul_hopper(x, w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x: expected shape \(M, K=256\)"):
        w4a16_matmul_hopper(x[:, :128], h)
    with pytest.raises(ValueError, match=r"x: dtype float32 is not bfloat16 or float16"):
        w4a16_matmul_hopper(x.astype(jnp.float32), h)
    with pytest.raises(ValueError, match=r"M=129 rows; this kernel is for M <= 128"):
        w4a16_matmul_hopper(jnp.zeros((129, 256), jnp.bfloat16), h)
    with pytest.raises(ValueError, match=r"bias: expected shape \(N,\) = \(128,\)"):
        w4a16_matmul_hopper(x, h, bias=jnp.zeros((3,), jnp.float32))
    with pytest.raises(ValueError, match=r"splits=3: must divide the 8 K slices"):
        w4a16_matmul_hopper(x, h, config=HopperW4Config(splits=3))
    with pytest.raises(ValueError, match=r"max_concurrent_steps=1"):
        HopperW4Config(max_concurrent_steps=1)
    with pytest.raises(ValueError, match=r"splits=0"):
        HopperW4Config(splits=0)
