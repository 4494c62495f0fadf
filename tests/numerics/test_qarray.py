"""QArray: bit packing, pytree behaviour under JAX transformations, real storage size, and the
agreement of the stored path (quantize -> dequantize) with the simulated one (quantize_dequantize)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qjax
from qjax import QArray, QParams, QuantSpec

# --- packing -----------------------------------------------------------------------------------


def _pack_reference(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis in numpy from the bit string: value j of a row occupies bits
    [j*bits, (j+1)*bits), bit i of the string is bit i % 8 of byte i // 8, the last byte padded
    with zero bits."""
    codes = values.astype(np.int64) & (2**bits - 1)
    bit_string = (codes[..., None] >> np.arange(bits)) & 1  # (..., n, bits), low bit first
    bit_string = bit_string.reshape((*values.shape[:-1], values.shape[-1] * bits)).astype(np.uint8)
    return np.packbits(bit_string, axis=-1, bitorder="little")


_pack_jit = jax.jit(qjax.pack, static_argnums=1)
_unpack_jit = jax.jit(qjax.unpack, static_argnums=(1, 2, 3))


@pytest.mark.parametrize("shape", [(3, 7), (13,), (2, 2, 5)])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("signed", [True, False])
@given(seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(shape, bits, signed, seed):
    rng = np.random.default_rng(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    dtype = np.int8 if signed else np.uint8
    values = rng.integers(lo, hi + 1, size=shape).astype(dtype)
    packed = _pack_jit(jnp.asarray(values), bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (*shape[:-1], -(-shape[-1] * bits // 8))
    np.testing.assert_array_equal(np.asarray(packed), _pack_reference(values, bits))
    out = _unpack_jit(packed, bits, shape[-1], signed)
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_array_equal(np.asarray(out), values)


def test_packed_layout_first_value_in_the_low_bits():
    # 2 bits: 1 | 2 << 2 | 3 << 4 | 0 << 6 = 1 + 8 + 48 = 57; then 2 (padded with zeros).
    np.testing.assert_array_equal(qjax.pack(jnp.array([1, 2, 3, 0, 2], jnp.uint8), 2), [57, 2])
    # 4 bits: 0x3 low, 0xA high -> 0xA3; the odd last value 0x5 sits alone in the low nibble.
    np.testing.assert_array_equal(qjax.pack(jnp.array([3, 10, 5], jnp.uint8), 4), [0xA3, 0x05])
    # Signed: -1 -> 0xF, 2 -> 0x2: 0x2F; -8 -> 0x8, 7 -> 0x7: 0x78.
    np.testing.assert_array_equal(qjax.pack(jnp.array([-1, 2, -8, 7], jnp.int8), 4), [0x2F, 0x78])
    # Signed 2 bits: -2 -> 0b10, -1 -> 0b11, 0 -> 0b00, 1 -> 0b01: 0b01_00_11_10 = 0x4E.
    np.testing.assert_array_equal(qjax.pack(jnp.array([-2, -1, 0, 1], jnp.int8), 2), [0x4E])
    np.testing.assert_array_equal(
        qjax.unpack(jnp.array([0x4E], jnp.uint8), 2, 4, signed=True), [-2, -1, 0, 1]
    )
    # 3 bits: 8 values in 3 bytes, value 2 straddling bytes 0 and 1 (bits 6..8), value 5 bytes 1
    # and 2 (bits 15..17): 1,2,7,0,0,5,0,3 -> bit string 100 010 111 000 000 101 000 110 (low first)
    np.testing.assert_array_equal(
        qjax.pack(jnp.array([1, 2, 7, 0, 0, 5, 0, 3], jnp.uint8), 3), [0xD1, 0x81, 0x62]
    )
    np.testing.assert_array_equal(
        qjax.unpack(jnp.array([0xD1, 0x81, 0x62], jnp.uint8), 3, 8, signed=False), [1, 2, 7, 0, 0, 5, 0, 3]
    )


def test_qarray_data_is_packed_int4():
    # int4 symmetric with scale 1: values 1, -2, 3 -> nibbles 0x1, 0xE, 0x3 -> bytes 0xE1, 0x03.
    spec = QuantSpec(dtype="int4")
    q = qjax.quantize(jnp.array([[1.0, -2.0, 3.0]]), spec, qparams=QParams(scale=jnp.ones((1, 1))))
    assert q.data.dtype == jnp.uint8 and q.data.shape == (1, 2) and q.shape == (1, 3)
    np.testing.assert_array_equal(q.data, [[0xE1, 0x03]])
    np.testing.assert_array_equal(q.values, [[1, -2, 3]])


def test_qarray_data_is_packed_fp4():
    # e2m1 codes: 1.0 = 0b0010, -0.5 = 0b1001, 6.0 = 0b0111 -> bytes 0x92, 0x07.
    spec = QuantSpec(dtype="float4_e2m1fn")
    q = qjax.quantize(jnp.array([[1.0, -0.5, 6.0]]), spec, qparams=QParams(scale=jnp.ones((1, 1))))
    np.testing.assert_array_equal(q.data, [[0x92, 0x07]])
    assert q.values.dtype == jnp.float4_e2m1fn
    np.testing.assert_array_equal(q.values.astype(jnp.float32), [[1.0, -0.5, 6.0]])


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_qarray_packs_odd_last_axis(bits):
    row_bytes = bits  # 7 values of b bits: ceil(7 b / 8) = b bytes
    x = jnp.asarray(np.random.default_rng(bits).normal(size=(5, 7)), jnp.float32)
    spec = QuantSpec(dtype=f"int{bits}", granularity="per_token")
    q = jax.jit(lambda x: qjax.quantize(x, spec))(x)
    assert q.data.shape == (5, row_bytes) and q.shape == (5, 7) and q.values.shape == (5, 7)
    np.testing.assert_array_equal(q.data, _pack_reference(np.asarray(q.values), bits))
    np.testing.assert_array_equal(q.values, np.asarray(qjax.quantize(x, spec).values))


# --- pytree behaviour --------------------------------------------------------------------------

_quantize = jax.jit(qjax.quantize, static_argnums=1)
_dequantize = jax.jit(qjax.dequantize)
SPEC4 = QuantSpec(dtype="int4", granularity="per_channel", axis=-1, symmetric=False)
X = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32)), jnp.float32)


def _assert_same_qarray(a: QArray, b: QArray) -> None:
    """Same static fields, same tree structure, leaves equal bit for bit (eager, jitted and
    batched code compute the same float32 scales)."""
    assert a.spec == b.spec and a.last_dim == b.last_dim
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_qarray_through_jit_as_argument_and_return_value():
    eager = qjax.quantize(X, SPEC4)
    jitted = jax.jit(lambda x: qjax.quantize(x, SPEC4))(X)
    assert isinstance(jitted, QArray)
    _assert_same_qarray(eager, jitted)
    _assert_same_qarray(jax.jit(lambda q: q)(jitted), jitted)
    np.testing.assert_array_equal(jax.jit(qjax.dequantize)(jitted), qjax.dequantize(jitted))

    @jax.jit
    def double_scale(q: QArray) -> QArray:
        return dataclasses.replace(q, scale=q.scale * 2)

    doubled = double_scale(eager)
    assert isinstance(doubled, QArray) and doubled.spec == SPEC4
    np.testing.assert_array_equal(qjax.dequantize(doubled), 2 * qjax.dequantize(eager))


def test_qarray_through_vmap():
    xs = jnp.asarray(
        np.random.default_rng(1).normal(size=(3, 16, 32)) * [[[1.0]], [[5.0]], [[0.1]]], jnp.float32
    )
    qs = jax.jit(jax.vmap(lambda x: qjax.quantize(x, SPEC4)))(xs)
    assert isinstance(qs, QArray)
    assert qs.data.shape == (3, 16, 16) and qs.scale.shape == (3, 1, 32) and qs.zero_point.shape == (3, 1, 32)
    for i in range(3):
        q_i = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], qs)
        _assert_same_qarray(q_i, _quantize(xs[i], SPEC4))
        out = jax.jit(jax.vmap(qjax.dequantize))(qs)
        np.testing.assert_array_equal(out[i], _dequantize(q_i))


def test_qarray_device_put():
    q = _quantize(X, SPEC4)
    _assert_same_qarray(jax.device_put(q), q)
    _assert_same_qarray(jax.device_put(q, jax.devices()[0]), q)


@pytest.mark.parametrize(
    ("spec", "n_leaves"),
    [
        (QuantSpec(dtype="int4"), 2),
        (SPEC4, 3),
        (QuantSpec(dtype="nvfp4", granularity="per_group", axis=-1), 3),
        (QuantSpec(dtype="kmeans2", granularity="per_channel", axis=0), 2),
    ],
    ids=["int4", "int4-asym", "nvfp4", "kmeans2"],
)
def test_qarray_tree_round_trip(spec, n_leaves):
    q = _quantize(X, spec)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == n_leaves
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, QArray)
    _assert_same_qarray(back, q)
    np.testing.assert_array_equal(_dequantize(back), _dequantize(q))


# --- real storage ------------------------------------------------------------------------------


def _spec(dtype, **kw):
    return QuantSpec(dtype=dtype, **kw)


PC = dict(granularity="per_channel", axis=-1)
GROUP = dict(granularity="per_group", axis=-1)


@pytest.mark.parametrize(
    ("spec", "shape", "expected"),
    [
        (_spec("int4", **PC), (64, 48), 64 * 24 + 48 * 4),
        (_spec("int4", **PC, symmetric=False), (64, 48), 64 * 24 + 48 * 4 + 48),
        (_spec("uint4", **PC, symmetric=False), (64, 48), 64 * 24 + 48 * 4 + 48),
        (_spec("int2", **PC), (64, 48), 64 * 12 + 48 * 4),
        (_spec("int3", **PC), (64, 48), 64 * 18 + 48 * 4),  # 48 values x 3 bits = 18 bytes a row
        (_spec("int3", **PC), (64, 50), 64 * 19 + 50 * 4),  # 50 values x 3 bits: 19 bytes
        (_spec("int3", **PC), (1568, 10), 1568 * 4 + 10 * 4),  # 10 x 3 bits: 4 bytes (int4: 5)
        (_spec("int6", **PC), (64, 48), 64 * 36 + 48 * 4),
        (_spec("kmeans3", **PC), (64, 48), 64 * 18 + 48 * 8 * 4),
        (_spec("int8", **PC), (64, 48), 64 * 48 + 48 * 4),
        (_spec("int8"), (64, 48), 64 * 48 + 4),
        (_spec("int4", granularity="per_group", axis=0, group_size=16), (64, 48), 64 * 24 + (4 * 48) * 4),
        (_spec("int4", granularity="per_token"), (8, 33), 8 * 17 + 8 * 4),
        (_spec("float8_e4m3fn", **PC), (64, 48), 64 * 48 + 48 * 4),
        (_spec("float8_e5m2", granularity="per_block", block_shape=(32, 16)), (64, 48), 64 * 48 + 2 * 3 * 4),
        (_spec("float4_e2m1fn", **PC), (64, 48), 64 * 24 + 48 * 4),
        (_spec("mxfp8", **GROUP), (64, 64), 64 * 64 + 64 * 2),
        (_spec("mxfp4", **GROUP), (64, 64), 64 * 32 + 64 * 2),
        (_spec("nvfp4", **GROUP), (64, 48), 64 * 24 + 64 * 3 + 4),
        (_spec("kmeans2", **PC), (64, 48), 64 * 12 + 48 * 4 * 4),
        (_spec("kmeans4"), (64, 48), 64 * 24 + 16 * 4),
    ],
    ids=lambda v: str(v) if isinstance(v, int | tuple) else f"{v.dtype}-{v.granularity}",
)
def test_nbytes_is_the_real_storage(spec, shape, expected):
    x = jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
    q = _quantize(x, spec)
    assert q.nbytes == expected
    assert q.compression_ratio() == pytest.approx(np.prod(shape) * 4 / expected)


def test_scale_dtypes_of_block_formats():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 64)), jnp.float32)
    mx = _quantize(x, QuantSpec(dtype="mxfp4", **GROUP))
    assert mx.scale.dtype == jnp.float8_e8m0fnu and mx.scale.shape == (4, 2) and mx.tensor_scale is None
    nv = _quantize(x, QuantSpec(dtype="nvfp4", **GROUP))
    assert nv.scale.dtype == jnp.float8_e4m3fn and nv.scale.shape == (4, 4)
    assert nv.tensor_scale.dtype == jnp.float32 and nv.tensor_scale.shape == ()


# --- stored values -----------------------------------------------------------------------------

XV = jnp.asarray(np.random.default_rng(4).normal(size=(16, 64)) * 3.0, jnp.float32)
_INT_BITS = range(2, 9)


def _values_cases():
    for b in _INT_BITS:
        yield QuantSpec(dtype=f"int{b}"), jnp.int8, -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
        yield QuantSpec(dtype=f"int{b}", symmetric=False), jnp.int8, -(2 ** (b - 1)), 2 ** (b - 1) - 1
        if b == 4:
            yield QuantSpec(dtype=f"int{b}", narrow_range=False), jnp.int8, -(2 ** (b - 1)), 2 ** (b - 1) - 1
        yield QuantSpec(dtype=f"uint{b}", **PC, symmetric=False), jnp.uint8, 0, 2**b - 1
    yield QuantSpec(dtype="float8_e4m3fn"), jnp.float8_e4m3fn, -448.0, 448.0
    yield QuantSpec(dtype="float8_e5m2"), jnp.float8_e5m2, -57344.0, 57344.0
    yield QuantSpec(dtype="float4_e2m1fn"), jnp.float4_e2m1fn, -6.0, 6.0
    yield QuantSpec(dtype="mxfp8", **GROUP), jnp.float8_e4m3fn, -448.0, 448.0
    yield QuantSpec(dtype="mxfp4", **GROUP), jnp.float4_e2m1fn, -6.0, 6.0
    yield QuantSpec(dtype="nvfp4", **GROUP), jnp.float4_e2m1fn, -6.0, 6.0
    for b in (1, 3):
        yield QuantSpec(dtype=f"kmeans{b}", **PC), jnp.uint8, 0, 2**b - 1


@pytest.mark.parametrize(
    ("spec", "dtype", "lo", "hi"),
    list(_values_cases()),
    ids=[
        f"{c[0].dtype}-{('sym' if c[0].narrow_range else 'sym_full') if c[0].symmetric else 'asym'}"
        for c in _values_cases()
    ],
)
def test_values_dtype_shape_and_range(spec, dtype, lo, hi):
    q = _quantize(XV, spec)
    v = q.values
    assert v.dtype == dtype and v.shape == XV.shape
    v = np.asarray(v.astype(jnp.float32))
    assert lo <= v.min() and v.max() <= hi
    if spec.dtype.startswith("float") or (spec.dtype.startswith("int") and spec.symmetric):
        # Minmax maps the absolute maximum onto the largest value of the format (the full range:
        # +-max|x| on +-(hi + 1/2), rounding onto hi, or to -(hi + 1) on the negative side).
        assert np.abs(v).max() in ((hi,) if spec.narrow_range else (hi, hi + 1))
    if spec.dtype.startswith("kmeans"):
        assert len(np.unique(v)) == 2**spec.format.bits  # well-spread data uses every centroid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])  # four, eight over three bytes, two per byte; int8
def test_full_range_codes_round_trip_through_storage(bits):
    """narrow_range=False stores the level -2^(b-1): it packs (below 8 bits, an odd last axis
    padded), unpacks and dequantizes exactly, through jit as a pytree."""
    spec = QuantSpec(dtype=f"int{bits}", narrow_range=False, **PC)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rng = np.random.default_rng(bits)
    codes = rng.integers(qmin, qmax + 1, size=(16, 63))
    codes[0], codes[1] = qmin, qmax
    scale = np.exp2(rng.integers(-4, 4, size=(1, 63))).astype(np.float32)  # x / S exact
    x = jnp.asarray(codes * scale, jnp.float32)
    q = jax.jit(lambda x, s: qjax.quantize(x, spec, qparams=QParams(s)))(x, jnp.asarray(scale))
    assert q.packed == (bits < 8) and q.data.dtype == (jnp.uint8 if bits < 8 else jnp.int8)
    assert q.data.shape == (16, -(-63 * bits // 8))
    np.testing.assert_array_equal(np.asarray(q.values), codes)
    np.testing.assert_array_equal(np.asarray(_dequantize(q)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.values)(q)), codes)


def _block_params(p: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Grid-shaped parameters repeated over their blocks (each grid axis divides its tensor axis)."""
    for axis, (g, n) in enumerate(zip(p.shape, shape, strict=True)):
        p = np.repeat(p, n // g, axis=axis)
    return p


def test_int_invariant_from_stored_parts():
    spec = QuantSpec(dtype="int3", granularity="per_group", axis=0, group_size=4, symmetric=False)
    q = _quantize(XV, spec)
    scale = _block_params(np.asarray(q.scale, np.float64), XV.shape)
    zp = _block_params(np.asarray(q.zero_point, np.float64), XV.shape)
    expected = (np.asarray(q.values, np.float64) - zp) * scale
    np.testing.assert_allclose(_dequantize(q), expected, rtol=1e-7, atol=0)


def test_mx_invariant_from_stored_parts():
    q = _quantize(XV, QuantSpec(dtype="mxfp4", **GROUP))
    scale = np.asarray(q.scale.astype(jnp.float32), np.float64)
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))  # E8M0: powers of two
    values = np.asarray(q.values).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    np.testing.assert_array_equal(_dequantize(q), values * _block_params(scale, XV.shape))


def test_nvfp4_invariant_from_stored_parts():
    q = _quantize(XV, QuantSpec(dtype="nvfp4", **GROUP))
    scale = np.asarray(q.scale.astype(jnp.float32), np.float64) * float(q.tensor_scale)
    values = np.asarray(q.values.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(_dequantize(q), values * _block_params(scale, XV.shape), rtol=1e-7)
    np.testing.assert_allclose(
        float(q.tensor_scale), np.abs(np.asarray(XV, np.float64)).max() / (448 * 6), rtol=1e-6
    )


def test_kmeans_invariant_from_stored_parts():
    q = _quantize(XV, QuantSpec(dtype="kmeans2", **PC))
    codebook = np.asarray(q.codebook)  # (1, 64, 4)
    assert codebook.shape == (1, 64, 4)
    expected = np.take_along_axis(codebook[0].T, np.asarray(q.values, np.int64), axis=0)
    np.testing.assert_array_equal(_dequantize(q), expected)


# --- the two paths agree -----------------------------------------------------------------------


def _parity_specs():
    for b in _INT_BITS:
        yield QuantSpec(dtype=f"int{b}", **PC)
        yield QuantSpec(dtype=f"int{b}", granularity="per_group", axis=0, group_size=8, symmetric=False)
        yield QuantSpec(dtype=f"uint{b}", granularity="per_token", symmetric=False)
        yield QuantSpec(dtype=f"uint{b}", granularity="per_block", block_shape=(4, 16))
    yield QuantSpec(dtype="int4", granularity="per_channel", axis=0, calibration="mse", mse_grid=16)
    yield QuantSpec(dtype="int4", granularity="per_token", calibration="percentile", percentile=99.0)
    yield QuantSpec(dtype="int4", granularity="per_token", rounding="stochastic")
    yield QuantSpec(dtype="float8_e5m2", granularity="per_token", rounding="stochastic")
    yield QuantSpec(dtype="uint3", granularity="per_token", rounding="floor", symmetric=False)
    for name in ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"):
        yield QuantSpec(dtype=name, **PC)
        yield QuantSpec(dtype=name, granularity="per_block", block_shape=(8, 32))
    yield QuantSpec(dtype="mxfp8", **GROUP)
    yield QuantSpec(dtype="mxfp4", **GROUP)
    yield QuantSpec(dtype="nvfp4", **GROUP)
    yield QuantSpec(dtype="nvfp4", granularity="per_group", axis=0)
    for b in range(1, 9):
        yield QuantSpec(dtype=f"kmeans{b}", **PC, kmeans_iters=10)
    yield QuantSpec(dtype="kmeans3", kmeans_iters=10)


@pytest.mark.parametrize(
    "spec", list(_parity_specs()), ids=lambda s: f"{s.dtype}-{s.granularity}-{s.calibration}-{s.rounding}"
)
def test_quantize_then_dequantize_equals_quantize_dequantize(spec):
    key = jax.random.key(7)

    @jax.jit
    def both(x):
        stored = qjax.dequantize(qjax.quantize(x, spec, key=key))
        return stored, qjax.quantize_dequantize(x, spec, key=key)

    stored, simulated = both(XV)
    assert stored.dtype == simulated.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(stored).view(np.uint32), np.asarray(simulated).view(np.uint32))


def test_dequantize_dtype_and_bfloat16_input():
    x = XV.astype(jnp.bfloat16)
    spec = QuantSpec(dtype="int8", **PC)
    simulated = jax.jit(lambda x: qjax.quantize_dequantize(x, spec))(x)
    assert simulated.dtype == jnp.bfloat16
    stored = jax.jit(lambda x: qjax.dequantize(qjax.quantize(x, spec), jnp.bfloat16))(x)
    assert stored.dtype == jnp.bfloat16
    np.testing.assert_array_equal(stored.astype(jnp.float32), simulated.astype(jnp.float32))
