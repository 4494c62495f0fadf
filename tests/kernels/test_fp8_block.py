"""Block-scaled FP8 (``qjax.kernels.fp8_block``): per-(token, 128-wide K group) activation scales and
per-128 x 128 block weight scales. Both kernel bodies (Triton's and Mosaic TPU's) run in the Pallas
interpreter and equal the reference within float32 rounding; the reference equals a float64 numpy
evaluation of the formula group by group; bad inputs are refused by name; both lowerings build.
The weight stored ``(N, K)`` (``fp8_block_matmul_nk``): here with K split, the rest in
``tests/kernels/experimental/test_nk_layout.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.experimental.nk_layout import fp8_block_matmul_nk
from qjax.kernels.fp8_block import fp8_block_matmul, fp8_block_matmul_reference

FP8 = jnp.float8_e4m3fn
EPS32 = float(np.finfo(np.float32).eps)
# M = 1 (decode), K and N off the 128 grid (a short last group, a partial last weight block), and
# several groups and column blocks.
SHAPES = [(1, 200, 130), (33, 384, 300), (64, 256, 256)]


def block_operands(rng, m, k, n, log2_scale):
    g, gn = -(-k // 128), -(-n // 128)
    x = jnp.asarray(np.clip(rng.normal(size=(m, k)) * 2.0**log2_scale, -448, 448), FP8)
    w = jnp.asarray(np.clip(rng.normal(size=(k, n)), -448, 448), FP8)
    xs = jnp.asarray(rng.uniform(1e-3, 1.0, (m, g)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1.0, (g, gn)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=n), jnp.float32)
    return x, xs, w, ws, bias


def block_float64(x, xs, w, ws, bias):
    """The formula in float64, group by group, and the sum of |terms| (for the rounding bound)."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (m, k), n = x64.shape, w64.shape[1]
    y, terms = np.zeros((m, n)), np.zeros((m, n))
    for g in range(xs.shape[1]):
        rows = slice(128 * g, min(k, 128 * (g + 1)))
        s = np.asarray(xs, np.float64)[:, g : g + 1] * np.repeat(np.asarray(ws, np.float64)[g], 128)[:n]
        y += (x64[:, rows] @ w64[rows]) * s
        terms += (np.abs(x64[:, rows]) @ np.abs(w64[rows])) * s
    b = np.asarray(bias, np.float64)
    return y + b, terms + np.abs(b)


_kernel = {
    body: jax.jit(functools.partial(fp8_block_matmul, out_dtype=jnp.float32, backend="interpret", body=body))
    for body in ("gpu", "tpu")
}
_reference = jax.jit(functools.partial(fp8_block_matmul_reference, out_dtype=jnp.float32))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log2_scale=st.integers(-8, 8))
def test_block_scaled_fp8_matches_reference_and_float64(shape, seed, log2_scale):
    m, k, n = shape
    x, xs, w, ws, bias = block_operands(np.random.default_rng(seed), m, k, n, log2_scale)
    y64, terms = block_float64(x, xs, w, ws, bias)
    ref = np.asarray(_reference(x, xs, w, ws, bias=bias), np.float64)
    # 128-term float32 sums per group, then G scaled additions: error <= (128 + G + 4) eps sum|terms|
    tol = (128 + xs.shape[1] + 4) * EPS32 * terms + 1e-30
    assert np.all(np.abs(ref - y64) <= tol)
    for body, fn in _kernel.items():
        y = np.asarray(fn(x, xs, w, ws, bias=bias), np.float64)
        assert y.shape == (m, n)
        assert np.all(np.abs(y - y64) <= tol), body


def test_bf16_output_and_no_bias():
    x, xs, w, ws, _ = block_operands(np.random.default_rng(1), 16, 256, 128, 0)
    y = fp8_block_matmul(x, xs, w, ws, backend="interpret")
    assert y.dtype == jnp.bfloat16
    ref = fp8_block_matmul_reference(x, xs, w, ws, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2**-7, atol=1e-6)


def test_block_scales_differ_from_one_scale():
    """The kernel does apply each group's own scale: doubling one group's activation scale changes
    exactly that group's contribution."""
    x, xs, w, ws, _ = block_operands(np.random.default_rng(2), 8, 256, 128, 0)
    y = np.asarray(fp8_block_matmul(x, xs, w, ws, out_dtype=jnp.float32, backend="interpret"), np.float64)
    y2 = np.asarray(
        fp8_block_matmul(x, xs.at[:, 1].multiply(2.0), w, ws, out_dtype=jnp.float32, backend="interpret"),
        np.float64,
    )
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    group1 = (x64[:, 128:] @ w64[128:]) * np.asarray(xs)[:, 1:2] * np.asarray(ws)[1, 0]
    np.testing.assert_allclose(y2 - y, group1, rtol=1e-4, atol=1e-4 * np.abs(group1).max())


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (
            {"x_scale": jnp.ones((4, 1), jnp.float32)},
            ValueError,
            r"x_scale has shape \(4, 1\), expected \(4, 2\)",
        ),
        (
            {"w_scale": jnp.ones((2, 2), jnp.float32)},
            ValueError,
            r"w_scale has shape \(2, 2\), expected \(2, 1\)",
        ),
        ({"w_scale": jnp.ones((2, 1), jnp.int32)}, TypeError, "w_scale must be a float32 array"),
        (
            {"x_q": jnp.ones((4, 256), jnp.float32)},
            TypeError,
            "x_q has dtype float32, expected float8_e4m3fn",
        ),
    ],
)
def test_refuses_bad_inputs(change, exc, match):
    args = {
        "x_q": jnp.ones((4, 256), FP8),
        "x_scale": jnp.ones((4, 2), jnp.float32),
        "w_q": jnp.ones((256, 100), FP8),
        "w_scale": jnp.ones((2, 1), jnp.float32),
    }
    args.update(change)
    with pytest.raises(exc, match=match):
        fp8_block_matmul(**args, backend="interpret")
    with pytest.raises(ValueError, match="no 'mosaic_gpu' backend"):
        fp8_block_matmul(
            jnp.ones((4, 256), FP8),
            jnp.ones((4, 2)),
            jnp.ones((256, 100), FP8),
            jnp.ones((2, 1)),
            backend="mosaic_gpu",
        )


@pytest.mark.parametrize(("backend", "platform"), [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("m", [1, 1024])
def test_lowers_for_accelerators(backend, platform, m, lowered):
    k, n = 4096, 1000
    args = (
        jax.ShapeDtypeStruct((m, k), FP8),
        jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
        jax.ShapeDtypeStruct((k, n), FP8),
        jax.ShapeDtypeStruct((k // 128, 8), jnp.float32),
    )
    fn = jax.jit(functools.partial(fp8_block_matmul, backend=backend))
    text = lowered(fn, *args, platform=platform)
    assert "qjax_fp8_block" in text


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("w_layout", ["kn", "nk"])
def test_split_k_matches_float64(m, split_k, w_layout):
    """K split over programs of the GPU body (5 groups: 3 + 2, or 2 + 2 + 1, the last range short),
    M not padded to the block (masked rows): within the same float32 bound of float64, and the
    bias added once (after XLA's sum of the partial sums)."""
    k, n = 640, 256
    x, xs, w, ws, bias = block_operands(np.random.default_rng(100 * m + split_k), m, k, n, 0)
    y64, terms = block_float64(x, xs, w, ws, bias)
    tol = (128 + xs.shape[1] + 4 + split_k) * EPS32 * terms + 1e-30
    matmul, wl = (fp8_block_matmul_nk, w.T) if w_layout == "nk" else (fp8_block_matmul, w)
    f = functools.partial(matmul, out_dtype=jnp.float32, backend="interpret", split_k=split_k)
    y = np.asarray(jax.jit(f)(x, xs, wl, ws, bias=bias), np.float64)
    assert y.shape == (m, n)
    assert np.all(np.abs(y - y64) <= tol)
    bf16 = jax.jit(functools.partial(fp8_block_matmul, backend="interpret", split_k=split_k))(x, xs, w, ws)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == (m, n)


def test_split_k_refused_off_gpu_and_lowers_for_cuda(lowered):
    x, xs, w, ws, _ = block_operands(np.random.default_rng(2), 1, 4096, 256, 0)
    with pytest.raises(ValueError, match=r"split_k=2: K is split on GPU \(Triton\) only"):
        fp8_block_matmul(x, xs, w, ws, backend="interpret", body="tpu", split_k=2)
    with pytest.raises(ValueError, match=r"split_k=40: must be between 1 and the 32 K steps"):
        fp8_block_matmul(x, xs, w, ws, backend="interpret", split_k=40)
    for split_k in (None, 3):  # None: M = 1, N = 256 fills the GPU by splitting K
        for matmul, wl in ((fp8_block_matmul, w), (fp8_block_matmul_nk, w.T)):
            f = functools.partial(matmul, backend="gpu", split_k=split_k)
            assert "qjax_fp8_block" in lowered(jax.jit(f), x, xs, wl, ws, platform="cuda")
