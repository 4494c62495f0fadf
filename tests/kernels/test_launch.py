"""The shared launch (``qjax.kernels.launch``) through the GPU body of W8A8 / int8 / FP8 with K
split over programs (``split_k``) and M not padded to the block (masked rows): int32-exact against
int64 numpy, the full W8A8 epilogue the same as the unsplit kernel, FP8 within the float32
accumulation bound of float64; the automatic rule on GPU; refusals; lowering; each with the weight
``(K, N)`` and stored ``(N, K)`` (the experimental ``*_nk`` kernels)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels import launch
from qjax.kernels.experimental.nk_layout import fp8_matmul_nk, int8_matmul_nk, w8a8_matmul_nk
from qjax.kernels.fp8 import fp8_matmul
from qjax.kernels.tuning import Blocks
from qjax.kernels.w8a8 import int8_matmul, w8a8_matmul, w8a8_matmul_reference

FP8 = jnp.float8_e4m3fn
EPS32 = float(np.finfo(np.float32).eps)
SMALL = Blocks(16, 64, 32, 4, 2)  # 16-row M blocks, 32-row K slices: several K steps at small K


def _int8(rng, shape):
    return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


def _interpret(fn, **kw):
    return jax.jit(functools.partial(fn, backend="interpret", blocks=SMALL, **kw))


# M = 1 and 5 (one partial M block), 17 (a full block and one row), 40 (two full blocks and a
# partial one); K = 200 is 7 slices of 32 (the last one padded), N = 37 not a multiple of 64.
@pytest.mark.parametrize("m", [1, 5, 17, 40])
@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_int8_split_k_is_exact(m, split_k, seed):
    k, n = 200, 37
    rng = np.random.default_rng(seed)
    x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
    exact = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
    for matmul, wl in ((int8_matmul, w), (int8_matmul_nk, w.T)):
        y = _interpret(matmul, split_k=split_k)(x, wl)
        assert y.shape == (m, n) and y.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(y), exact)


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_w8a8_split_k_equals_one_range_with_the_full_epilogue(m, per_tensor):
    """Zero points, bias, per-token (or per-tensor) scales: the epilogue after XLA's sum of the int32
    partial sums gives what the kernel's own epilogue gives, up to the rounding of one float32
    multiply-add (a compiler may contract it into an FMA in one place and not the other)."""
    k, n = 300, 130
    rng = np.random.default_rng(m)
    x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
    rows = 1 if per_tensor else m
    xs = jnp.asarray(rng.uniform(1e-3, 1e-1, (rows, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1e-1, (1, n)), jnp.float32)
    zp = jnp.asarray(rng.integers(-128, 128, (rows, 1)), jnp.int32)
    b = jnp.asarray(rng.normal(size=n), jnp.float32)
    kw = dict(x_zero_point=zp, bias=b, out_dtype=jnp.float32)
    one = np.asarray(_interpret(w8a8_matmul, split_k=1, **kw)(x, xs, w, ws))
    split = np.asarray(_interpret(w8a8_matmul, split_k=4, **kw)(x, xs, w, ws))
    ref = np.asarray(w8a8_matmul_reference(x, xs, w, ws, **kw))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(split, one, rtol=2 * EPS32, atol=2 * EPS32 * scale)
    np.testing.assert_allclose(split, ref, rtol=4 * EPS32, atol=4 * EPS32 * scale)
    bf16 = _interpret(w8a8_matmul, split_k=4, x_zero_point=zp, bias=b)(x, xs, w, ws)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == (m, n)


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("split_k", [1, 3])
def test_fp8_split_k_matches_float64(m, split_k):
    k, n = 256, 70
    rng = np.random.default_rng(10 * m + split_k)
    x = jnp.asarray(np.clip(rng.normal(size=(m, k)) * 8, -448, 448), FP8)
    w = jnp.asarray(np.clip(rng.normal(size=(k, n)), -448, 448), FP8)
    xs = jnp.asarray(rng.uniform(1e-3, 1.0, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1.0, (1, n)), jnp.float32)
    b = jnp.asarray(rng.normal(size=n), jnp.float32)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    s = np.asarray(xs, np.float64) * np.asarray(ws, np.float64)
    y64 = (x64 @ w64) * s + np.asarray(b, np.float64)
    bound = (np.abs(x64) @ np.abs(w64)) * s * (k + 2) * EPS32 + np.abs(y64) * 4 * EPS32
    for matmul, wl in ((fp8_matmul, w), (fp8_matmul_nk, w.T)):
        kw = dict(split_k=split_k, bias=b, out_dtype=jnp.float32)
        y = np.asarray(_interpret(matmul, **kw)(x, xs, wl, ws), np.float64)
        assert np.all(np.isfinite(y))
        assert np.all(np.abs(y - y64) <= bound)


def test_split_k_ranges_rule():
    """Explicit counts: ceil(steps / ranges) steps per range, the last one the rest; the automatic
    count: a power of two, ranges of >= 2 steps, about GPU_TARGET_PROGRAMS programs."""
    assert launch.split_k_ranges(4, 10, 4) == (4, 3)  # 3 + 3 + 3 + 1
    assert launch.split_k_ranges(4, 9, 4) == (3, 3)  # 3 + 3 + 3: three ranges
    assert launch.split_k_ranges(4, 9, 1) == (1, 9)
    assert launch.split_k_ranges(4, 9, 9) == (9, 1)
    assert launch.split_k_ranges(launch.GPU_TARGET_PROGRAMS, 100) == (1, 100)  # a full grid: no split
    assert launch.split_k_ranges(64, 32) == (4, 8)  # M = 1, N = 4096 in 64-wide blocks, K = 4096
    assert launch.split_k_ranges(1, 6) == (3, 2)  # never below 2 steps a range
    assert launch.split_k_ranges(1, 1) == (1, 1)
    for bad in (0, 11):
        with pytest.raises(ValueError, match=rf"split_k={bad}: must be between 1 and the 10 K steps"):
            launch.split_k_ranges(4, 10, bad)


def _pallas_grid(fn, *args):
    """The grid of the one ``pallas_call`` in ``fn``'s jaxpr."""
    (eqn,) = [e for e in jax.make_jaxpr(fn)(*args).eqns if e.primitive.name == "pallas_call"]
    return tuple(eqn.params["grid_mapping"].grid)


def test_auto_split_on_gpu_and_one_range_elsewhere():
    """On ``backend="gpu"`` a decode-sized grid is split along K (traced, not run: no GPU here); the
    interpreter runs one range unless asked; a large-M grid is not split."""
    k, n = 4096, 256
    rng = np.random.default_rng(0)
    w = _int8(rng, (k, n))
    blocks = Blocks(16, 64, 128, 4, 4)  # N / 64 = 4 programs at M = 1; K / 128 = 32 steps
    for backend, m, want in (("gpu", 1, (1, 4, 16)), ("interpret", 1, (1, 4, 1)), ("gpu", 1024, (64, 4, 1))):
        x = _int8(rng, (m, k))
        f = functools.partial(int8_matmul, backend=backend, blocks=blocks)
        assert _pallas_grid(f, x, w) == want, (backend, m)


def test_split_k_refusals():
    rng = np.random.default_rng(1)
    x, w = _int8(rng, (4, 64)), _int8(rng, (64, 32))
    with pytest.raises(ValueError, match=r"split_k=3: must be between 1 and the 2 K steps"):
        int8_matmul(x, w, backend="interpret", blocks=SMALL, split_k=3)
    with pytest.raises(ValueError, match=r"split_k=2: K is split on GPU \(Triton\) only"):
        jax.jit(functools.partial(int8_matmul, backend="tpu", split_k=2)).trace(x, w)
    with pytest.raises(ValueError, match=r"no 'mosaic_gpu' backend; .*qjax.kernels.experimental.hopper"):
        jax.jit(functools.partial(int8_matmul, backend="mosaic_gpu", split_k=2)).trace(x, w)


@pytest.mark.parametrize("m", [1, 16])
def test_split_k_lowers_for_cuda(m, lowered):
    """The split GPU body (masked rows, a short last K range, int32 / f32 partial sums) lowers for
    ``cuda``; K = 4096 in 128-row slices at N = 256 splits 16 ways."""
    k, n = 4096, 256
    scales = (jax.ShapeDtypeStruct((m, 1), jnp.float32), jax.ShapeDtypeStruct((1, n), jnp.float32))
    blocks = Blocks(16, 64, 128, 4, 4)
    fns = ((w8a8_matmul, jnp.int8, (k, n)), (fp8_matmul, FP8, (k, n)))
    fns += ((w8a8_matmul_nk, jnp.int8, (n, k)), (fp8_matmul_nk, FP8, (n, k)))  # the weight (N, K)
    for fn, dtype, w_shape in fns:
        for split_k in (None, 3):
            x = jax.ShapeDtypeStruct((m, k), dtype)
            w = jax.ShapeDtypeStruct(w_shape, dtype)
            f = functools.partial(fn, backend="gpu", blocks=blocks, split_k=split_k)
            text = lowered(jax.jit(f), x, scales[0], w, scales[1], platform="cuda")
            assert "qjax_" in text
