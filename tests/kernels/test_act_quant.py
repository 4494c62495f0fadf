"""Fused per-token activation quantization (``qjax.kernels.act_quant``): bit for bit the framework's
own per-token quantizer (``qjax.quantize`` with ``granularity="per_token"``) for int8 and e4m3,
on ordinary, all-zero, constant, tiny and huge rows, never NaN/Inf, with the int8 error bound;
both kernel bodies; bad inputs refused by name; both accelerators' lowerings build.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.act_quant import (
    quantize_per_token,
    quantize_per_token_reference,
    round_half_even,
)

DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
X_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
SHAPES = [(1, 100), (37, 130), (70, 600)]


def _rows(rng: np.random.Generator, shape: tuple[int, int], log2_scale: int, x_dtype) -> jax.Array:
    """Normal rows at 2**log2_scale, with special rows: zeros, a constant, tiny and huge values."""
    m, k = shape
    x = rng.normal(size=shape) * 2.0**log2_scale
    big = float(jnp.finfo(x_dtype).max) * 0.9
    special = [np.zeros(k), np.full(k, -3.25), np.full(k, 1e-30), np.where(np.arange(k) % 2, big, -big)]
    for i, row in enumerate(special[: m - 1] if m > 1 else []):
        x[i + 1] = row
    return jnp.asarray(np.clip(x, -big, big), x_dtype)


def _bits(a: jax.Array) -> np.ndarray:
    return np.asarray(a).view(np.uint8)


def _assert_same(got, want):
    (q, s), (qr, sr) = got, want
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape == (q.shape[0], 1)
    np.testing.assert_array_equal(_bits(q), _bits(qr))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(sr))


_kernel = {
    (d, body): jax.jit(
        lambda x, d=d, body=body: quantize_per_token(x, dtype=DTYPES[d], backend="interpret", body=body)
    )
    for d in DTYPES
    for body in ("gpu", "tpu")
}
_reference = {d: jax.jit(functools.partial(quantize_per_token_reference, dtype=t)) for d, t in DTYPES.items()}


@pytest.mark.parametrize("x_dtype", list(X_DTYPES), ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log2_scale=st.integers(-20, 20))
def test_bit_exact_vs_reference(shape, dtype, x_dtype, seed, log2_scale):
    x = _rows(np.random.default_rng(seed), shape, log2_scale, X_DTYPES[x_dtype])
    want = _reference[dtype](x)
    got = jax.jit(functools.partial(quantize_per_token, dtype=DTYPES[dtype]))(x)
    _assert_same(got, want)
    q, s = got
    deq = np.asarray(q, np.float64) * np.asarray(s, np.float64)
    assert np.all(np.isfinite(deq)) and np.all(np.asarray(s) > 0)
    if dtype == "int8":  # inside the range, the error is at most half a step (plus 1/S's rounding)
        err = np.abs(np.asarray(x, np.float64) - deq)
        assert np.all(err <= np.asarray(s, np.float64) * (0.5 + 1e-4)), float(np.max(err / np.asarray(s)))


@pytest.mark.parametrize("body", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_both_bodies_interpreted(dtype, body):
    """The chunked GPU body (masked ragged M and K, several chunks) and the whole-row TPU body."""
    x = _rows(np.random.default_rng(11), (45, 1100), 0, jnp.bfloat16)
    _assert_same(_kernel[(dtype, body)](x), _reference[dtype](x))


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_one_row_per_program(dtype, m):
    """The GPU body with ``block_m = 1`` (the table's choice at decode: M programs, each walking one
    row in chunks of 8192, the last one masked) is bit for bit the reference."""
    x = _rows(np.random.default_rng(m), (m, 9000), 3, jnp.bfloat16)
    kw = dict(dtype=DTYPES[dtype], blocks={"block_m": 1}, backend="interpret", body="gpu")
    f = jax.jit(lambda x: quantize_per_token(x, **kw))
    _assert_same(f(x), _reference[dtype](x))


def test_gpu_table_runs_a_program_per_row_at_decode():
    from qjax.kernels import tuning

    assert [
        tuning.choose_blocks("act_quant", "gpu", m, device_kind="x").block_m for m in (1, 16, 64, 65)
    ] == [
        1,
        1,
        1,
        16,
    ]


def test_special_rows_are_safe():
    x = jnp.asarray(
        [
            np.zeros(64),
            np.full(64, 7.0),
            np.full(64, 1e-30),
            np.full(64, -3e38),
            np.linspace(-3e38, 3e38, 64),
        ],
        jnp.float32,
    )
    for dtype in DTYPES.values():
        q, s = quantize_per_token(x, dtype=dtype)
        _assert_same((q, s), quantize_per_token_reference(x, dtype=dtype))
        qf = np.asarray(q, np.float64)
        assert np.all(np.isfinite(qf)) and np.all(np.isfinite(np.asarray(s))) and np.all(np.asarray(s) > 0)
        assert np.all(qf[0] == 0)  # an all-zero row stays zero
        qmax = 127.0 if dtype == jnp.int8 else 448.0
        assert np.all(np.abs(qf[1:4]) == qmax)  # a constant row maps onto the largest value


def test_round_half_even_matches_jnp_round():
    halves = np.arange(-300, 301) / 2.0
    rng = np.random.default_rng(12)
    y = np.concatenate(
        [halves, np.nextafter(halves, 0), np.nextafter(halves, 1000), rng.uniform(-130, 130, 2000)]
    )
    y = jnp.asarray(np.clip(y, -127.0, 127.0), jnp.float32)
    np.testing.assert_array_equal(np.asarray(round_half_even(y)), np.asarray(jnp.round(y)))


@pytest.mark.parametrize(
    "x, kwargs, exc, match",
    [
        (jnp.zeros((4, 8), jnp.int32), {}, TypeError, r"x must be a float array .* got int32"),
        (jnp.zeros((2, 4, 8), jnp.float32), {}, ValueError, r"x has shape \(2, 4, 8\) \(rank 3\)"),
        (jnp.zeros((4, 8), jnp.float32), dict(dtype=jnp.int4), ValueError, r"dtype='int4'"),
        (jnp.zeros((4, 8), jnp.float32), dict(dtype=jnp.float8_e5m2), ValueError, r"float8_e5m2"),
        (
            jnp.zeros((4, 8), jnp.float32),
            dict(backend="gpu", blocks={"block_m": 24}),
            ValueError,
            r"block_m=24",
        ),
        (
            jnp.zeros((4, 8), jnp.float32),
            dict(backend="tpu", blocks={"block_m": 16}),
            ValueError,
            r"multiple of 32",
        ),
    ],
)
def test_refuses_bad_inputs(x, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize_per_token(x, **kwargs)


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("backend, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_lowers_for_accelerators(backend, platform, dtype, m, lowered):
    x = jax.ShapeDtypeStruct((m, 4000), jnp.bfloat16)
    f = functools.partial(quantize_per_token, dtype=DTYPES[dtype], backend=backend)
    text = lowered(jax.jit(f), x, platform=platform)
    assert "qjax_act_quant" in text
