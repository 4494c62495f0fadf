"""AWQ (qjax.methods.awq_core): the scale search against plain round-to-nearest, the folding, and
the clipping search, with errors recomputed in float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from qjax.methods.awq_core import awq_clip_search, awq_search, clip_ratios, fold_scales

K = 256
INT4_G128 = qjax.QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=128)
INT3_G128 = qjax.QuantSpec(dtype="int3", granularity="per_group", axis=0, group_size=128)
INT3_G64_ASYM = qjax.QuantSpec(dtype="int3", granularity="per_group", axis=0, group_size=64, symmetric=False)
INT4_PC = qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
INT3_G128_FULL = qjax.QuantSpec(
    dtype="int3", granularity="per_group", axis=0, group_size=128, narrow_range=False
)


def _data(seed: int, n: int = 512, outliers: int = 0, outs: tuple[int, ...] = (64, 32)):
    """Inputs (n, K) with per-channel magnitudes spread over two decades (``outliers`` channels x50)
    and kernels (K, N_i)."""
    rng = np.random.default_rng(seed)
    mags = np.exp(rng.uniform(-1.0, 1.0, K))
    mags[rng.choice(K, outliers, replace=False)] *= 50.0
    x = (rng.standard_normal((n, K)) * mags).astype(np.float32)
    ws = [(rng.standard_normal((K, o)) * 0.05).astype(np.float32) for o in outs]
    return x, ws


def _awq_error(x, ws, s, spec) -> float:
    """:math:`\\sum_i \\|x W_i - (x / s) Q(\\operatorname{diag}(s) W_i)\\|^2 / n` in float64 (Q in qjax)."""
    x64, s64 = np.asarray(x, np.float64), np.asarray(s, np.float64)
    total = 0.0
    for w in ws:
        q = np.asarray(qjax.quantize_dequantize(jnp.asarray(w * np.asarray(s)[:, None]), spec), np.float64)
        total += np.sum(np.square(x64 @ np.asarray(w, np.float64) - (x64 / s64) @ q))
    return total / len(x)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spec=st.sampled_from([INT4_G128, INT3_G64_ASYM]))
def test_search_never_worse_than_round_to_nearest(seed, spec):
    x, ws = _data(seed, n=256)
    r = awq_search(x, ws, spec, grid=10)
    assert float(r.alphas[0]) == 0.0 and float(r.rtn_error) == float(r.errors[0])
    assert float(r.error) <= float(r.rtn_error) and float(r.error) == float(np.min(np.asarray(r.errors)))
    ones = np.ones(K, np.float32)
    rtn = _awq_error(x, ws, ones, spec)
    assert rtn == pytest.approx(float(r.rtn_error), rel=1e-4)
    assert _awq_error(x, ws, r.scales, spec) <= rtn * (1 + 1e-4)
    if float(r.alpha) == 0.0:
        np.testing.assert_array_equal(np.asarray(r.scales), ones)


@pytest.mark.parametrize(("spec", "bound"), [(INT3_G128, 0.45), (INT4_G128, 0.45)], ids=["int3", "int4"])
def test_outlier_channels_beat_round_to_nearest(spec, bound):
    x, ws = _data(1, outliers=4, outs=(96, 96, 64))
    r = awq_search(x, ws, spec)
    ratio = _awq_error(x, ws, r.scales, spec) / _awq_error(x, ws, np.ones(K, np.float32), spec)
    assert ratio < bound, ratio  # measured 0.29 (int3 and int4)
    assert 0.0 < float(r.alpha) < 1.0


def test_fold_scales_leaves_the_float_function_unchanged():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, K))
    gamma, prev = rng.uniform(0.5, 2.0, K), rng.standard_normal((48, K))  # RMSNorm / previous linear
    x_prev = rng.standard_normal((32, 48))
    ws = [rng.standard_normal((K, 64)), rng.standard_normal((K, 16))]
    s = np.exp(rng.uniform(-3.0, 3.0, K))
    with jax.enable_x64(True):
        g2, ws2 = fold_scales(gamma, ws, s)
        p2, _ = fold_scales(prev, ws, s)
        assert g2.dtype == jnp.float64
        for w, w2 in zip(ws, ws2, strict=True):
            np.testing.assert_allclose(
                (x * np.asarray(g2)) @ np.asarray(w2), (x * gamma) @ w, rtol=1e-12, atol=1e-12
            )
            np.testing.assert_allclose(
                (x_prev @ np.asarray(p2)) @ np.asarray(w2), (x_prev @ prev) @ w, rtol=1e-12, atol=1e-11
            )


@pytest.mark.parametrize(
    "spec",
    [INT3_G128, INT3_G64_ASYM, INT4_PC, INT3_G128_FULL],
    ids=["int3-g128", "int3-g64-asym", "int4-pc", "int3-g128-full_range"],
)
def test_clip_search_never_worsens_a_block(spec):
    rng = np.random.default_rng(3)
    x, _ = _data(3, n=256)
    w = (rng.standard_t(3, (K, 48)) * 0.05).astype(np.float32)  # heavy tails: clipping pays
    r = awq_clip_search(x, w, spec)
    assert float(r.error) <= float(r.unclipped_error)
    q = qjax.quantize(r.w_hat, spec, qparams=r.qparams)
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), np.asarray(r.w_hat))
    ratios = np.asarray(r.ratios)
    assert set(np.unique(ratios)) <= set(clip_ratios(20, 0.5).tolist()) and (ratios < 1).any()
    rows = K // ratios.shape[0]
    x64 = np.asarray(x, np.float64).reshape(len(x), -1, rows)

    def block_errors(w_hat):  # (K/G, N): ||x_g (w_gj - w_hat_gj)||^2
        d = (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)).reshape(-1, rows, w.shape[1])
        return np.sum(np.square(np.einsum("tga,gaj->tgj", x64, d)), axis=0)

    clipped, plain = block_errors(r.w_hat), block_errors(qjax.quantize_dequantize(w, spec))
    assert np.all(clipped <= plain * (1 + 1e-4) + 1e-9)
    assert clipped.sum() < 0.85 * plain.sum()  # measured 0.61, 0.75, 0.69
    assert clipped.sum() / len(x) == pytest.approx(float(r.error), rel=1e-3)


def test_errors():
    x, ws = _data(4, n=64)
    with pytest.raises(ValueError, match=r"x has shape \(256,\)"):
        awq_search(x[0], ws, INT4_G128)
    with pytest.raises(ValueError, match="non-empty list of kernels"):
        awq_search(x, [], INT4_G128)
    with pytest.raises(ValueError, match=r"ws\[1\] has shape \(128, 32\) but x has K=256"):
        awq_search(x, [ws[0], ws[1][:128]], INT4_G128)
    with pytest.raises(ValueError, match="grid=0 must be a positive int"):
        awq_search(x, ws, INT4_G128, grid=0)
    with pytest.raises(ValueError, match="not 'stochastic'"):
        awq_search(
            x, ws, qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1, rounding="stochastic")
        )
    with pytest.raises(ValueError, match="group_size=96 does not divide axis 0"):
        awq_search(x, ws, qjax.QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=96))
    with pytest.raises(TypeError, match="floating-point"):
        awq_search(x.astype(np.int32), ws, INT4_G128)
    with pytest.raises(ValueError, match=r"max_shrink=1\.0 must be in \[0, 1\)"):
        awq_clip_search(x, ws[0], INT4_G128, max_shrink=1.0)
    with pytest.raises(ValueError, match="use 'per_group' with axis=0"):
        awq_clip_search(x, ws[0], qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=0))
    with pytest.raises(ValueError, match="k-means codebook"):
        awq_clip_search(x, ws[0], qjax.QuantSpec(dtype="kmeans4"))
    with pytest.raises(ValueError, match=r"need s \(K,\) and prev \(\.\.\., K\)"):
        fold_scales(np.ones(10), ws, np.ones(K))
    with pytest.raises(ValueError, match=r"ws\[0\] has shape \(10, 3\)"):
        fold_scales(np.ones(K), [np.ones((10, 3))], np.ones(K))
