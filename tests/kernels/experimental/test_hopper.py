"""The Hopper (Mosaic GPU) kernels of W8A8 and FP8 (``qjax.kernels.experimental.hopper``).

On CPU the kernel runs in Pallas' GPU interpreter, which simulates the shared memory, barriers,
TMA copies and ``wgmma`` of the kernel. The kernel's 16-bit variant (the weight read ``(K, N)``) on
integer data that bfloat16 holds exactly checks the persistent schedule, the pipeline, padding, the
epilogue and the output tiling against the int32 reference bit for bit on every jax. The 8-bit
variants (int8 and e4m3 ``wgmma``, weight ``(N, K)`` read through a transposed shared-memory view)
run in the interpreter of jax >= 0.11 (jax 0.10's cannot read such views: there the test checks
the error that says so), are checked to lower for ``cuda`` (Mosaic GPU's layout inference and its
shared-memory accounting run at lowering), and on a GPU by ``experiments.kernels.check``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.experimental import hopper
from qjax.kernels.experimental.nk_layout import NK
from qjax.kernels.tuning import Blocks
from qjax.kernels.w4a16 import pack_w4, w4a16_matmul
from qjax.kernels.w8a8 import w8a8_matmul_reference

SMALL = hopper.HopperConfig(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=2, max_ctas=2)


def _interpreted(x, w, epi, n, cfg):
    return hopper.scaled_matmul_hopper(
        x.astype(jnp.bfloat16),
        w.astype(jnp.bfloat16),
        epi,
        n=n,
        acc_dtype=jnp.float32,
        out_dtype=jnp.float32,
        config=cfg,
        interpret=True,
    )


_interp = jax.jit(_interpreted, static_argnames=("n", "cfg"))


def _ints(rng, shape, lo=-128, hi=128):
    return jnp.asarray(rng.integers(lo, hi, shape), jnp.int8)


def _w8a8_epilogue(rng, w, m, n, x_scale=None, w_scale=None):
    """The W8A8 epilogue operands of the kernel: scales (drawn unless given), zero points, the
    weight's column sums, bias."""
    if x_scale is None:
        x_scale = jnp.asarray(rng.uniform(1e-3, 1e-1, (m, 1)), jnp.float32)
        w_scale = jnp.asarray(rng.uniform(1e-3, 1e-1, (1, n)), jnp.float32)
    return {
        "x_scale": x_scale,
        "w_scale": w_scale,
        "x_zp": jnp.asarray(rng.integers(-20, 20, (m, 1)), jnp.int32),
        "colsum": jnp.sum(w.astype(jnp.int32), axis=0, keepdims=True),
        "bias": jnp.asarray(rng.normal(size=n), jnp.float32).reshape(1, n),
    }


# (M, K, N, config): one tile with the default tiles; M = 1 and N, K off the tiles; more tiles than
# CTAs (the persistent loop walks several tiles per CTA), K over several slices.
CASES = [
    (64, 128, 128, hopper.HopperConfig(max_ctas=1)),
    (1, 200, 136, SMALL),
    (70, 300, 520, SMALL),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:3])))
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_interpreted_schedule_is_exact(case, seed):
    m, k, n, cfg = case
    rng = np.random.default_rng(seed)
    x, w = _ints(rng, (m, k)), _ints(rng, (k, n))
    # K * 128 * 128 < 2**24: every partial sum is an integer float32 holds exactly.
    out = _interp(x, w, {}, n, cfg)
    assert out.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x, np.int64) @ np.asarray(w, np.int64))


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_interpreted_epilogue_matches_reference(seed):
    m, k, n = 70, 300, 520
    rng = np.random.default_rng(seed)
    x, w = _ints(rng, (m, k)), _ints(rng, (k, n), -127, 128)
    epi = _w8a8_epilogue(rng, w, m, n)
    x_scale, w_scale, zp = epi["x_scale"], epi["w_scale"], epi["x_zp"]
    bias = epi["bias"].reshape(n)
    out = np.asarray(_interp(x, w, epi, n, SMALL))
    ref = w8a8_matmul_reference(x, x_scale, w, w_scale, x_zero_point=zp, bias=bias, out_dtype=jnp.float32)
    # Same float32 operations in the same order on an exact accumulator: equal up to the
    # accumulator's conversion (exact here) and float32 rounding of the two products.
    np.testing.assert_allclose(out, np.asarray(ref), rtol=4 * np.finfo(np.float32).eps, atol=1e-6)
    exact = ((np.asarray(x, np.float64) - np.asarray(zp)) @ np.asarray(w, np.float64)) * np.asarray(
        x_scale, np.float64
    ) * np.asarray(w_scale, np.float64) + np.asarray(bias)
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_interpreted_8bit_variants(seed):
    """int8 ``wgmma`` (int32 accumulator, zero points, scales, bias) and e4m3 ``wgmma`` (f32
    accumulator) on the (N, K) weight: int8 equal to the reference up to float32 rounding of the
    epilogue, e4m3 within float32 rounding of a float64 evaluation. Where the interpreter cannot
    run them (jax < 0.11), the call is refused with an error that names the way out."""
    m, k, n = 70, 300, 200
    rng = np.random.default_rng(seed)
    x, w = _ints(rng, (m, k)), _ints(rng, (k, n), -127, 128)
    x_scale = jnp.asarray(rng.uniform(1e-3, 1e-1, (m, 1)), jnp.float32)
    w_scale = jnp.asarray(rng.uniform(1e-3, 1e-1, (1, n)), jnp.float32)

    def int32_sums(x, w, config=None):
        return hopper.scaled_matmul_hopper(
            x,
            hopper.prepare_weight(w),
            {},
            n=w.shape[1],
            acc_dtype=jnp.int32,
            out_dtype=jnp.int32,
            config=config,
            interpret=True,
        )

    if not hopper.INTERPRETS_8BIT:
        with pytest.raises(NotImplementedError, match=r"16-bit variant, use jax >= 0\.11"):
            int32_sums(x, w)
        return
    exact = np.asarray(int32_sums(x, w, SMALL))
    np.testing.assert_array_equal(exact, np.asarray(x, np.int64) @ np.asarray(w, np.int64))
    for m2, k2, n2 in [(256, 384, 600), (16, 256, 256)]:  # the table's tiles for large and small M
        cfg = dataclasses.replace(hopper.choose_config(m2), max_ctas=2)
        x2, w2 = _ints(rng, (m2, k2)), _ints(rng, (k2, n2))
        y2 = int32_sums(x2, w2, cfg)
        np.testing.assert_array_equal(np.asarray(y2), np.asarray(x2, np.int64) @ np.asarray(w2, np.int64))
    epi = _w8a8_epilogue(rng, w, m, n, x_scale, w_scale)
    zp, bias = epi["x_zp"], epi["bias"].reshape(n)
    out = hopper.scaled_matmul_hopper(
        x,
        hopper.prepare_weight(w),
        epi,
        n=n,
        acc_dtype=jnp.int32,
        out_dtype=jnp.float32,
        config=SMALL,
        interpret=True,
    )
    ref = w8a8_matmul_reference(x, x_scale, w, w_scale, x_zero_point=zp, bias=bias, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=4 * np.finfo(np.float32).eps, atol=1e-6)
    xf = jnp.asarray(rng.normal(size=(m, k)), jnp.float8_e4m3fn)
    wf = jnp.asarray(rng.normal(size=(k, n)), jnp.float8_e4m3fn)
    out = hopper.scaled_matmul_hopper(
        xf,
        hopper.prepare_weight(wf),
        {"x_scale": x_scale, "w_scale": w_scale},
        n=n,
        acc_dtype=jnp.float32,
        out_dtype=jnp.float32,
        config=SMALL,
        interpret=True,
    )
    terms = np.abs(np.asarray(xf, np.float64)) @ np.abs(np.asarray(wf, np.float64))
    scale = np.asarray(x_scale, np.float64) * np.asarray(w_scale, np.float64)
    expect = (np.asarray(xf, np.float64) @ np.asarray(wf, np.float64)) * scale
    # f32 accumulation of K products (exact: e4m3 x e4m3 fits float32), then two scalings
    np.testing.assert_array_less(
        np.abs(np.asarray(out) - expect), (k + 3) * np.finfo(np.float32).eps * terms * scale + 1e-30
    )


@pytest.mark.parametrize("m", [1, 200, 4096])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_8bit_kernels_lower_for_cuda(m, out_dtype, lowered):
    k, n = 1000, 520
    x = jax.ShapeDtypeStruct((m, k), jnp.int8)
    w = jax.ShapeDtypeStruct((k, n), jnp.int8)
    xs = jax.ShapeDtypeStruct((m, 1), jnp.float32)
    ws = jax.ShapeDtypeStruct((1, n), jnp.float32)
    zp = jax.ShapeDtypeStruct((m, 1), jnp.int32)
    bias = jax.ShapeDtypeStruct((n,), jnp.float32)

    def w8a8(*a):
        return hopper.w8a8_matmul_hopper(*a[:4], x_zero_point=a[4], bias=a[5], out_dtype=out_dtype)

    text = lowered(jax.jit(w8a8), x, xs, w, ws, zp, bias, platform="cuda")
    assert "mosaic_gpu" in text
    x8 = jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn)
    w8 = jax.ShapeDtypeStruct((k, n), jnp.float8_e4m3fn)

    def fp8(*a):
        return hopper.fp8_matmul_hopper(*a, out_dtype=out_dtype)

    text = lowered(jax.jit(fp8), x8, xs, w8, ws, platform="cuda")
    assert "mosaic_gpu" in text
    raw = jax.jit(hopper.int8_matmul_hopper)
    assert "mosaic_gpu" in lowered(raw, x, w, platform="cuda")
    raw_nk = jax.jit(lambda a, b: hopper.int8_matmul_hopper(a, b, layout=NK))  # no transpose
    text = lowered(raw_nk, x, jax.ShapeDtypeStruct((n, k), jnp.int8), platform="cuda")
    assert "mosaic_gpu" in text and "stablehlo.transpose" not in text
    assert "stablehlo.transpose" in lowered(raw, x, w, platform="cuda")


def test_prepared_weight_is_the_padded_transpose():
    w = jnp.arange(300 * 130, dtype=jnp.int32).reshape(300, 130).astype(jnp.int8)
    cfg = hopper.HopperConfig()
    wt = hopper.prepare_weight(w, cfg)
    assert wt.shape == (256, 384)  # N to 2 * tile_n, K to tile_k
    np.testing.assert_array_equal(np.asarray(wt[:130, :300]), np.asarray(w).T)
    assert not np.asarray(wt[130:]).any() and not np.asarray(wt[:, 300:]).any()


def test_table_keeps_fewer_slices_in_flight_when_shared_memory_is_short():
    bf16 = hopper.choose_config(4096, operand_bytes=1, out_bytes=2, depth=1)
    f32 = hopper.choose_config(4096, operand_bytes=1, out_bytes=4, depth=1)
    assert bf16.max_concurrent_steps == 4 and f32.max_concurrent_steps == 3
    for cfg, ob in ((bf16, 2), (f32, 4)):
        assert hopper.smem_bytes(cfg, 1 << 30, 1, ob, 1) <= hopper.SMEM_BYTES


@pytest.mark.parametrize(
    ("fields", "exc", "match"),
    [
        ({"tile_m": 96}, ValueError, "multiple of 64"),
        ({"tile_n": 320}, ValueError, "<= 256"),
        ({"tile_k": 64}, ValueError, "multiple of 128"),
        ({"epi_tile_n": 48}, ValueError, "must divide tile_n"),
        ({"max_concurrent_steps": 0}, ValueError, "positive integer"),
    ],
)
def test_config_refuses_bad_tiles(fields, exc, match):
    with pytest.raises(exc, match=match):
        hopper.HopperConfig(**fields)


def test_refusals_name_the_fix():
    x = jnp.zeros((4, 256), jnp.int8)
    w = jnp.zeros((256, 128), jnp.int8)
    s = jnp.ones((1, 1), jnp.float32)
    big = {"max_concurrent_steps": 8, "tile_k": 256}
    with pytest.raises(ValueError, match=r"shared memory.*lower max_concurrent_steps"):
        hopper.w8a8_matmul_hopper(
            jnp.zeros((4, 4096), jnp.int8), s, jnp.zeros((4096, 128), jnp.int8), s, config=big
        )
    with pytest.raises(TypeError, match="HopperConfig or a mapping"):
        hopper.w8a8_matmul_hopper(x, s, w, s, config=Blocks(64, 64, 64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown fields"):
        hopper.w8a8_matmul_hopper(x, s, w, s, config={"block_m": 64})
    packed = pack_w4(jnp.zeros((256, 128), jnp.int32), jnp.ones((2, 128), jnp.float32), group_size=128)
    with pytest.raises(ValueError, match="no 'mosaic_gpu' backend"):
        w4a16_matmul(jnp.zeros((4, 256), jnp.bfloat16), packed, backend="mosaic_gpu")


@pytest.mark.parametrize(("size", "m"), [("small", 16), ("large", 4096)])
def test_tuning_candidates_lower_for_cuda(size, m, lowered):
    """Every config ``experiments.kernels.tune`` tries fits sm_90's shared memory by our estimate
    and by Mosaic GPU's own accounting at lowering (bf16 output, K = N = 4096)."""
    from experiments.kernels.tune import HOPPER_CANDIDATES

    x = jax.ShapeDtypeStruct((m, 4096), jnp.int8)
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.int8)
    xs = jax.ShapeDtypeStruct((m, 1), jnp.float32)
    ws = jax.ShapeDtypeStruct((1, 4096), jnp.float32)
    for cfg in HOPPER_CANDIDATES[size]:
        fn = jax.jit(lambda *a, cfg=cfg: hopper.w8a8_matmul_hopper(*a, config=cfg))
        assert "mosaic_gpu" in lowered(fn, x, xs, w, ws, platform="cuda"), cfg
