"""Every bad input fails loudly, with a message that names the argument, the bad value and the fix."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QParams, QuantSpec

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "suggestion"),
    [("in8", "int8"), ("float8_e4m3", "float8_e4m3fn"), ("mxfp_4", "mxfp4"), ("kmean4", "kmeans4")],
)
def test_unknown_dtype_suggests_the_closest_format(dtype, suggestion):
    with pytest.raises(
        ValueError, match=rf"dtype='{dtype}' is not a known format.*did you mean '{suggestion}'"
    ):
        QuantSpec(dtype=dtype)


def test_unknown_dtype_lists_the_known_formats():
    with pytest.raises(ValueError, match=r"Known formats: int2, int3.*nvfp4.*kmeans8") as info:
        QuantSpec(dtype="bfloat3")
    for name in qjax.FORMAT_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("dtype", "prefix"),
    [("int9", "int"), ("int1", "int"), ("int0", "int"), ("uint0", "uint"), ("uint16", "uint")],
)
def test_bits_out_of_range_states_the_valid_bits(dtype, prefix):
    with pytest.raises(
        ValueError, match=rf"dtype='{dtype}' is not a known format; {prefix} formats have 2\.\.8 bits"
    ):
        QuantSpec(dtype=dtype)


def test_kmeans_bits_out_of_range():
    with pytest.raises(ValueError, match=r"dtype='kmeans9'.*kmeans formats have 1\.\.8 bits"):
        QuantSpec(dtype="kmeans9")


def test_dtype_that_is_not_a_string():
    with pytest.raises(TypeError, match=r"dtype=8 must be a string such as 'int8'; got int"):
        QuantSpec(dtype=8)


# --- enums -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "bad", "good"),
    [
        ("granularity", "per_chanel", "per_channel"),
        ("granularity", "per_grp", "per_group"),
        ("rounding", "stochastc", "stochastic"),
        ("rounding", "nearst", "nearest"),
        ("calibration", "minmx", "minmax"),
        ("calibration", "percentil", "percentile"),
    ],
)
def test_unknown_enum_value_suggests_the_closest(field, bad, good):
    kwargs = {field: bad}
    with pytest.raises(
        ValueError, match=rf"{field}='{bad}' is not one of \[.*'{good}'.*\]; did you mean '{good}'"
    ):
        QuantSpec(**kwargs)


def test_unknown_enum_value_without_close_match_lists_the_choices():
    with pytest.raises(
        ValueError, match=r"calibration='mean' is not one of \['minmax', 'percentile', 'mse'\]"
    ):
        QuantSpec(calibration="mean")


def test_symmetric_must_be_a_bool():
    with pytest.raises(TypeError, match="symmetric='yes' must be true or false"):
        QuantSpec(symmetric="yes")


# --- granularity against the spec and the tensor -----------------------------------------------


@pytest.mark.parametrize("axis", [2, -3, 7])
def test_axis_out_of_range(axis):
    spec = QuantSpec(granularity="per_channel", axis=axis)
    with pytest.raises(
        ValueError, match=rf"axis={axis} is out of range for a tensor of rank 2; use an axis in \[-2, 1\]"
    ):
        qjax.quantize(X, spec)
    with pytest.raises(ValueError, match=rf"axis={axis} is out of range"):
        jax.jit(lambda x: qjax.quantize_dequantize(x, spec))(X)


def test_axis_named_twice():
    spec = QuantSpec(granularity="per_channel", axis=(1, -1))
    with pytest.raises(ValueError, match=r"axis=\(1, -1\) names the same axis twice; list each axis once"):
        qjax.calibrate(X, spec)


def test_group_size_not_dividing_the_axis():
    spec = QuantSpec(granularity="per_group", axis=1, group_size=4)
    msg = (
        r"group_size=4 does not divide axis 1 of size 6 \(tensor shape \(4, 6\)\); use a divisor of 6 or pad"
    )
    with pytest.raises(ValueError, match=msg):
        qjax.quantize(X, spec)
    with pytest.raises(ValueError, match=msg):
        jax.jit(lambda x: qjax.fake_quant(x, spec))(X)


def test_block_shape_not_tiling():
    spec = QuantSpec(granularity="per_block", block_shape=(3, 3))
    msg = (
        r"block_shape=\(3, 3\) does not tile the tensor \(4, 6\): 3 does not divide axis 0 of size 4; "
        "use block extents that divide the axes"
    )
    with pytest.raises(ValueError, match=msg):
        qjax.quantize_dequantize(X, spec)


def test_block_shape_with_more_axes_than_the_tensor():
    spec = QuantSpec(granularity="per_block", block_shape=(1, 2, 3))
    with pytest.raises(
        ValueError, match=r"block_shape=\(1, 2, 3\) has 3 axes but the tensor \(4, 6\) has 2; give at most 2"
    ):
        qjax.calibrate(X, spec)


def test_per_block_needs_a_block_shape():
    with pytest.raises(
        ValueError, match=r"granularity='per_block' needs block_shape=<positive ints>.*got None"
    ):
        QuantSpec(granularity="per_block")
    with pytest.raises(
        ValueError, match=r"needs block_shape=<positive ints>, e\.g\. \(128, 128\); got \(0, 2\)"
    ):
        QuantSpec(granularity="per_block", block_shape=(0, 2))


def test_per_group_without_axis():
    with pytest.raises(ValueError, match=r"granularity='per_group' needs axis=<axis to group along"):
        QuantSpec(granularity="per_group", group_size=4)


def test_per_group_without_group_size():
    with pytest.raises(
        ValueError, match=r"granularity='per_group' needs group_size=<positive int>.*got None"
    ):
        QuantSpec(granularity="per_group", axis=0)


def test_per_group_over_several_axes_must_be_consecutive():
    QuantSpec(granularity="per_group", axis=(0, 1), group_size=2)  # flattened in order
    with pytest.raises(ValueError, match=r"along consecutive axes flattened in order .* got axis=\(0, 2\)"):
        QuantSpec(granularity="per_group", axis=(0, 2), group_size=2)
    with pytest.raises(ValueError, match=r"groups its blocks along one axis"):
        QuantSpec(dtype="mxfp8", granularity="per_group", axis=(0, 1), group_size=32)


def test_per_channel_without_axis():
    with pytest.raises(ValueError, match=r"granularity='per_channel' needs axis=<channel axis"):
        QuantSpec(granularity="per_channel")


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_token", "per_block"])
def test_group_size_outside_per_group(granularity):
    kwargs = {"axis": -1} if granularity == "per_channel" else {}
    if granularity == "per_block":
        kwargs = {"block_shape": (2, 2)}
    with pytest.raises(
        ValueError,
        match=rf"group_size=4 only applies to granularity='per_group' "
        rf"\(granularity is '{granularity}'\); remove it",
    ):
        QuantSpec(granularity=granularity, group_size=4, **kwargs)


def test_block_shape_outside_per_block():
    with pytest.raises(
        ValueError, match=r"block_shape=\(2, 2\) only applies to granularity='per_block'; remove it"
    ):
        QuantSpec(granularity="per_tensor", block_shape=(2, 2))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_axis_without_meaning(granularity):
    with pytest.raises(
        ValueError, match=rf"axis=0 has no meaning for granularity='{granularity}'; remove it"
    ):
        QuantSpec(granularity=granularity, axis=0)


# --- formats against the rest of the spec ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"])
def test_float_formats_are_symmetric(dtype):
    with pytest.raises(
        ValueError, match=rf"dtype='{dtype}' is a float format, symmetric by construction; set symmetric=True"
    ):
        QuantSpec(dtype=dtype, symmetric=False)


def test_block_float_formats_are_symmetric():
    with pytest.raises(ValueError, match=r"dtype='mxfp8' is a float format.*set symmetric=True"):
        QuantSpec(dtype="mxfp8", granularity="per_group", axis=-1, symmetric=False)


@pytest.mark.parametrize(("dtype", "block"), [("mxfp8", 32), ("mxfp4", 32), ("nvfp4", 16)])
def test_block_float_formats_with_the_wrong_group_size(dtype, block):
    with pytest.raises(
        ValueError,
        match=rf"group_size=8 does not match dtype='{dtype}', "
        rf"whose blocks hold {block} elements; set group_size={block}",
    ):
        QuantSpec(dtype=dtype, granularity="per_group", axis=-1, group_size=8)


@pytest.mark.parametrize(("dtype", "block"), [("mxfp4", 32), ("nvfp4", 16)])
def test_block_float_formats_need_per_group(dtype, block):
    with pytest.raises(
        ValueError,
        match=rf"dtype='{dtype}' shares one scale per {block} elements: set granularity='per_group'",
    ):
        QuantSpec(dtype=dtype)


def test_block_float_default_group_size():
    assert QuantSpec(dtype="mxfp4", granularity="per_group", axis=-1).group_size == 32
    assert QuantSpec(dtype="nvfp4", granularity="per_group", axis=-1).group_size == 16


def test_kmeans_restrictions():
    with pytest.raises(
        ValueError, match=r"dtype='kmeans3' \(k-means codebook\) supports granularity 'per_tensor'"
    ):
        QuantSpec(dtype="kmeans3", granularity="per_token")
    with pytest.raises(
        ValueError,
        match=r"dtype='kmeans3' assigns each value to its nearest centroid: set rounding='nearest'",
    ):
        QuantSpec(dtype="kmeans3", rounding="floor")
    with pytest.raises(ValueError, match=r"dtype='kmeans3' has a codebook, not a scale and zero point"):
        qjax.calibrate(X, QuantSpec(dtype="kmeans3"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(dtype="uint4"), r"narrow_range=False chooses the full symmetric range of a signed integer"),
        (dict(dtype="float8_e4m3fn"), r"dtype='float8_e4m3fn' has no such choice: remove narrow_range"),
        (dict(dtype="mxfp4", granularity="per_group", axis=-1), r"dtype='mxfp4' has no such choice"),
        (dict(dtype="kmeans3"), r"dtype='kmeans3' has no such choice"),
        (
            dict(dtype="int4", symmetric=False),
            r"narrow_range=False applies to symmetric grids; dtype='int4' with symmetric=False already "
            r"uses the full range \[-2\^\(b-1\), 2\^\(b-1\)-1\] with a zero point: remove narrow_range",
        ),
    ],
    ids=["unsigned", "float", "mx", "kmeans", "asymmetric"],
)
def test_full_range_needs_a_symmetric_signed_integer_format(fields, message):
    with pytest.raises(qjax.SpecError, match=message) as e:
        QuantSpec(narrow_range=False, **fields)
    assert e.value.field == "narrow_range"
    QuantSpec(narrow_range=True, **fields)  # the default is accepted everywhere


def test_narrow_range_must_be_a_bool():
    with pytest.raises(qjax.SpecTypeError, match="narrow_range=0 must be true or false") as e:
        QuantSpec(narrow_range=0)
    assert e.value.field == "narrow_range"


@pytest.mark.parametrize("bits", range(2, 9))
def test_full_range_reaches_the_format(bits):
    """``spec.format`` knows its range, so every path through the format agrees on it."""
    narrow, full = QuantSpec(dtype=f"int{bits}"), QuantSpec(dtype=f"int{bits}", narrow_range=False)
    qmax = 2 ** (bits - 1) - 1
    assert narrow.format.qrange(True) == (-qmax, qmax)
    assert full.format.qrange(True) == (-qmax - 1, qmax)
    assert full.format.qrange(False) == narrow.format.qrange(False) == (-qmax - 1, qmax)
    assert full.format.name == f"int{bits}" and full.bits == bits
    lo, hi = full.format.clip_range(QParams(scale=jnp.float32(0.5)))
    assert (float(lo), float(hi)) == (-(qmax + 1) * 0.5, qmax * 0.5)


@pytest.mark.parametrize(
    "fields",
    [dict(dtype="int8"), dict(dtype="nvfp4", granularity="per_group", axis=-1), dict(dtype="float8_e4m3fn")],
    ids=["int8", "nvfp4", "fp8"],
)
def test_mx_scale_rounding_only_for_mx_formats(fields):
    with pytest.raises(
        qjax.SpecError,
        match=rf"mx_scale_rounding='ceil' chooses the shared power-of-two exponent of an MX block "
        rf"\(dtype 'mxfp8' or 'mxfp4'\); dtype='{fields['dtype']}' has none: remove mx_scale_rounding",
    ) as e:
        QuantSpec(mx_scale_rounding="ceil", **fields)
    assert e.value.field == "mx_scale_rounding"


def test_mx_scale_rounding_values():
    spec = QuantSpec(dtype="mxfp8", granularity="per_group", axis=-1, mx_scale_rounding="ceil")
    assert spec.mx_scale_rounding is qjax.MXScaleRounding.CEIL
    assert spec.format.scale_rounding is qjax.MXScaleRounding.CEIL
    assert QuantSpec(dtype="mxfp4", granularity="per_group", axis=-1).format.scale_rounding == "floor"
    with pytest.raises(qjax.SpecError, match=r"mx_scale_rounding='round' is not one of \['floor', 'ceil'\]"):
        QuantSpec(dtype="mxfp8", granularity="per_group", axis=-1, mx_scale_rounding="round")


# --- stochastic rounding -----------------------------------------------------------------------


def test_stochastic_rounding_without_key():
    spec = QuantSpec(dtype="int4", rounding="stochastic")
    msg = (
        r"rounding='stochastic' needs a PRNG key; "
        r"pass key=jax\.random\.key\(seed\) or choose rounding='nearest'"
    )
    with pytest.raises(ValueError, match=msg):
        qjax.quantize(X, spec)
    with pytest.raises(ValueError, match=msg):
        qjax.quantize_dequantize(X, spec)
    with pytest.raises(ValueError, match=msg):
        jax.jit(lambda x: qjax.fake_quant(x, spec))(X)
    with pytest.raises(ValueError, match=msg):
        qjax.fake_quant(X, spec, "clipped_ste")


# --- inputs ------------------------------------------------------------------------------------


INT_INPUT_MSG = (
    r"x has dtype int32, but quantization needs a floating-point tensor; convert it first, e\.g\. x\.astype"
)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: qjax.quantize(x, QuantSpec()),
        lambda x: qjax.quantize_dequantize(x, QuantSpec()),
        lambda x: qjax.calibrate(x, QuantSpec()),
        lambda x: qjax.fake_quant(x, QuantSpec()),
        lambda x: qjax.fake_quant(x, QuantSpec(), "clipped_ste"),
        lambda x: qjax.quantize(x, QuantSpec(dtype="kmeans2")),
    ],
    ids=["quantize", "quantize_dequantize", "calibrate", "fake_quant", "fake_quant_clipped", "kmeans"],
)
def test_integer_input_is_refused(call):
    x_int = jnp.arange(24, dtype=jnp.int32).reshape(4, 6)
    with pytest.raises(TypeError, match=INT_INPUT_MSG):
        call(x_int)
    with pytest.raises(TypeError, match=INT_INPUT_MSG):
        jax.jit(call)(x_int)


def _with_bad_values(kind):
    if kind == "nan":
        return X.at[1, 2].set(jnp.nan), 1
    return X.at[0, 0].set(jnp.inf).at[3, 5].set(-jnp.inf), 2


NONFINITE_MSG = (
    r"x holds {n} NaN or Inf value\(s\) \(seen when computing its scales\); quantization needs finite inputs"
)


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("calibration", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize(
    "call",
    [
        lambda x, s: qjax.calibrate(x, s),
        lambda x, s: qjax.quantize(x, s),
        lambda x, s: qjax.quantize_dequantize(x, s),
        lambda x, s: qjax.fake_quant(x, s),
        lambda x, s: qjax.fake_quant(x, s, "clipped_ste"),
    ],
    ids=["calibrate", "quantize", "quantize_dequantize", "fake_quant", "fake_quant_clipped"],
)
def test_nonfinite_values_found_during_eager_calibration(call, calibration, kind):
    x, n = _with_bad_values(kind)
    spec = QuantSpec(dtype="int4", granularity="per_channel", axis=-1, calibration=calibration)
    with pytest.raises(ValueError, match=NONFINITE_MSG.format(n=n)):
        call(x, spec)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_values_in_kmeans(kind):
    x, n = _with_bad_values(kind)
    with pytest.raises(ValueError, match=NONFINITE_MSG.format(n=n)):
        qjax.quantize(x, QuantSpec(dtype="kmeans2"))


def test_nonfinite_values_with_given_qparams_are_not_calibration():
    """With static qparams nothing is calibrated, so nothing is checked; the bad value saturates."""
    spec = QuantSpec(dtype="int8")
    out = qjax.quantize_dequantize(X.at[0, 0].set(jnp.inf), spec, qparams=QParams(scale=jnp.ones((1, 1))))
    assert float(out[0, 0]) == 127.0


# --- parameters of calibration -----------------------------------------------------------------


@pytest.mark.parametrize("p", [50, 49.0, 100.5, 101, -1.0])
def test_percentile_out_of_range(p):
    with pytest.raises(ValueError, match=rf"percentile={p} must be in \(50, 100\], e\.g\. 99\.99"):
        QuantSpec(calibration="percentile", percentile=p)


def test_percentile_bounds_accepted():
    assert QuantSpec(percentile=100).percentile == 100
    assert QuantSpec(percentile=50.001).percentile == 50.001


@pytest.mark.parametrize("grid", [1, 0, 2.5])
def test_mse_grid_out_of_range(grid):
    with pytest.raises(ValueError, match=rf"mse_grid={grid!r} must be an int >= 2, e\.g\. 100"):
        QuantSpec(calibration="mse", mse_grid=grid)


def test_kmeans_iters_out_of_range():
    with pytest.raises(ValueError, match=r"kmeans_iters=0 must be an int >= 1, e\.g\. 30"):
        QuantSpec(dtype="kmeans2", kmeans_iters=0)


# --- config dictionaries -----------------------------------------------------------------------


def test_from_dict_unknown_key_suggests_the_field():
    with pytest.raises(
        ValueError, match=r"unknown QuantSpec field 'granularty'; did you mean 'granularity'\? Fields: dtype"
    ):
        QuantSpec.from_dict({"dtype": "int4", "granularty": "per_tensor"})
    with pytest.raises(ValueError, match=r"unknown QuantSpec field 'group'; did you mean 'group_size'\?"):
        QuantSpec.from_dict({"group": 32})


def test_from_dict_unknown_key_without_close_match_lists_the_fields():
    with pytest.raises(ValueError, match=r"unknown QuantSpec field 'zzz' Fields: dtype, granularity, axis"):
        QuantSpec.from_dict({"zzz": 1})


def test_from_dict_needs_a_mapping():
    with pytest.raises(TypeError, match="a QuantSpec needs a mapping of its fields; got list"):
        QuantSpec.from_dict([("dtype", "int4")])


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(),
        QuantSpec(dtype="int4", granularity="per_channel", axis=-1, symmetric=False),
        QuantSpec(dtype="int3", granularity="per_channel", axis=(0, 2)),
        QuantSpec(
            dtype="uint8", granularity="per_token", rounding="stochastic", calibration="mse", mse_grid=20
        ),
        QuantSpec(
            dtype="int4",
            granularity="per_group",
            axis=0,
            group_size=128,
            calibration="percentile",
            percentile=99.9,
        ),
        QuantSpec(dtype="float8_e4m3fn", granularity="per_block", block_shape=(128, 128)),
        QuantSpec(dtype="mxfp4", granularity="per_group", axis=-1),
        QuantSpec(dtype="nvfp4", granularity="per_group", axis=0),
        QuantSpec(dtype="kmeans3", granularity="per_channel", axis=1, kmeans_iters=5),
        QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=32, narrow_range=False),
        QuantSpec(dtype="mxfp8", granularity="per_group", axis=-1, mx_scale_rounding="ceil"),
    ],
    ids=lambda s: f"{s.dtype}-{s.granularity}-{s.narrow_range}-{s.mx_scale_rounding}",
)
def test_dict_round_trip(spec):
    d = spec.to_dict()
    assert QuantSpec.from_dict(d) == spec
    assert QuantSpec.from_dict(d).format == spec.format
    assert hash(QuantSpec.from_dict(d)) == hash(spec)
    # Plain values only, as a YAML or JSON config file holds them.
    for value in d.values():
        assert value is None or type(value) in (str, int, float, bool, list), (value, type(value))
    assert type(d["granularity"]) is str and type(d["rounding"]) is str and type(d["calibration"]) is str
    assert type(d["mx_scale_rounding"]) is str and type(d["narrow_range"]) is bool


def test_from_dict_turns_strings_and_lists_into_typed_values():
    spec = QuantSpec.from_dict(
        {"dtype": "int4", "granularity": "per_block", "block_shape": [2, 3], "rounding": "floor"}
    )
    assert spec.granularity is qjax.Granularity.PER_BLOCK
    assert spec.rounding is qjax.Rounding.FLOOR
    assert spec.block_shape == (2, 3)
    assert spec == QuantSpec(dtype="int4", granularity="per_block", block_shape=(2, 3), rounding="floor")


def test_axis_must_be_ints():
    with pytest.raises(TypeError, match=re.escape("axis='x' must be an int or a non-empty list of ints")):
        QuantSpec(granularity="per_channel", axis="x")
    with pytest.raises(TypeError, match=re.escape("axis=[] must be an int or a non-empty list of ints")):
        QuantSpec(granularity="per_channel", axis=[])


# --- quantization parameters -------------------------------------------------------------------


def test_qparams_scale_of_the_wrong_shape():
    spec = QuantSpec(granularity="per_channel", axis=-1)
    with pytest.raises(
        ValueError,
        match=r"qparams\.scale has shape \(4, 1\) but this spec and tensor need one per block, "
        r"shape \(1, 6\); calibrate with the same spec",
    ):
        qjax.quantize(X, spec, qparams=QParams(scale=jnp.ones((4, 1))))


def test_qparams_zero_point_of_the_wrong_shape():
    spec = QuantSpec(granularity="per_channel", axis=-1, symmetric=False)
    qp = QParams(scale=jnp.ones((1, 6)), zero_point=jnp.zeros((1, 5), jnp.int8))
    with pytest.raises(ValueError, match=r"qparams\.zero_point has shape \(1, 5\) but .* shape \(1, 6\)"):
        jax.jit(lambda x: qjax.quantize_dequantize(x, spec, qparams=qp))(X)


def test_qparams_from_another_spec():
    qp = qjax.calibrate(X, QuantSpec(granularity="per_token"))
    with pytest.raises(ValueError, match=r"qparams\.scale has shape \(4, 1\) .* shape \(1, 6\)"):
        qjax.quantize(X, QuantSpec(granularity="per_channel", axis=-1), qparams=qp)


def test_spec_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"spec must be a qjax\.QuantSpec; got dict"):
        qjax.quantize(X, {"dtype": "int8"})
    with pytest.raises(TypeError, match=r"dequantize needs a qjax\.QArray; got ArrayImpl"):
        qjax.dequantize(X)


def test_scalar_with_a_granularity_that_needs_axes():
    with pytest.raises(
        ValueError, match="granularity='per_token' needs a tensor with at least one axis; got a scalar"
    ):
        qjax.quantize(jnp.float32(1.0), QuantSpec(granularity="per_token"))
