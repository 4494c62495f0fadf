"""qjax.nn serving: a converted model's ``serve`` forward equals its ``qat`` (fake-quant) forward.

Each layer is compared on the same input (the input the qat model feeds it), so a float-rounding
difference in one layer cannot flip a rounding decision in the next. "Within float rounding" is
``|serve - qat| <= 1e-5 max|qat|``: one quantization step of error is ~1e-3 of the output scale.
Also: the integer path lowers to an i8 x i8 -> i32 contraction, kernels are stored packed.
"""

import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec
from qjax.nn import QuantizedWeight, Rule
from tests.nn.serving import (
    A8_TENSOR,
    A8_TOKEN,
    AU8_ASYM,
    CNN,
    FP8_ACTS,
    FP8_CH,
    INT4_CH,
    INT4_G16,
    INT8_ACTS,
    INT8_CH,
    MLP,
    Attention,
    Embeds,
    parity_errors,
    rules_for,
    shifted,
)

# --- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [INT8_CH, INT4_CH, INT4_G16], ids=["w8", "w4", "w4g16"])
def test_mlp_serve_equals_qat(weights, rng):
    batches = [shifted(rng, 8, 32) for _ in range(2)]
    _, served = parity_errors(MLP(nnx.Rngs(0)), rules_for(weights, INT8_ACTS), shifted(rng, 8, 32), batches)
    _, zero_point, _ = served.layers[3].dot_general.static.get_value()
    assert int(zero_point) != 0  # the asymmetric layer exercises the zero-point correction terms


def test_full_range_weights_serve_equal_qat(rng):
    """narrow_range=False: served kernels hold the level -2^(b-1) and serve what fake quantization
    computes: int4 in groups of 16 (layers 0, 1), int8 per channel (layers 2, 3), int8 activations."""
    w4 = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=16, narrow_range=False)
    w8 = QuantSpec(dtype="int8", granularity="per_channel", axis=-1, narrow_range=False)
    rules = [
        Rule(path=f"layers/{i}", weights=w, activations=a, activation_scale=scale)
        for i, (w, (a, scale)) in enumerate(zip([w4, w4, w8, w8], INT8_ACTS, strict=True))
    ]
    batches = [shifted(rng, 8, 32) for _ in range(2)]
    _, served = parity_errors(MLP(nnx.Rngs(0)), rules, shifted(rng, 8, 32), batches)
    for bits, layers in ((4, served.layers[:2]), (8, served.layers[2:])):
        codes = np.concatenate([np.asarray(layer.kernel[...].values).ravel() for layer in layers])
        assert codes.min() == -(2 ** (bits - 1)) and codes.max() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize(
    "weights",
    [
        QuantSpec(dtype="int8", granularity="per_channel", axis=(1, 2)),
        QuantSpec(dtype="int4", granularity="per_channel", axis=(1, 2)),
        INT4_G16,
    ],
    ids=["w8", "w4", "w4g16"],
)
def test_einsum_serve_equals_qat(weights, rng):
    batches = [shifted(rng, 2, 3, 32) for _ in range(2)]
    parity_errors(Attention(nnx.Rngs(0)), rules_for(weights, INT8_ACTS), shifted(rng, 2, 3, 32), batches)


@pytest.mark.parametrize("weights", [INT8_CH, INT4_CH], ids=["w8", "w4"])
def test_cnn_serve_equals_qat(weights, rng):
    acts = [(AU8_ASYM, "static"), (A8_TENSOR, "dynamic"), (A8_TENSOR, "static"), (AU8_ASYM, "static")]
    batches = [shifted(rng, 2, 12, 12, 4) for _ in range(2)]
    _, served = parity_errors(CNN(nnx.Rngs(0)), rules_for(weights, acts), shifted(rng, 2, 12, 12, 4), batches)
    for i in (0, 3):  # SAME and VALID with a zero point: padded borders need the ones-convolution
        assert int(served.layers[i].conv_general_dilated.static.get_value()[1]) != 0


def test_embed_serve_equals_qat(rng):
    specs = [
        QuantSpec(dtype="int8", granularity="per_channel", axis=0),
        QuantSpec(dtype="int4", granularity="per_channel", axis=0),
        QuantSpec(dtype="int4", granularity="per_group", axis=-1, group_size=16),
    ]
    rules = [Rule(path=f"layers/{i}", weights=s) for i, s in enumerate(specs)]
    errors, served = parity_errors(
        Embeds(nnx.Rngs(0)), rules, jnp.asarray(rng.integers(0, 40, (2, 5)), jnp.int32)
    )
    assert errors == [0.0, 0.0, 0.0]  # the same dequantized rows
    assert served.layers[1].embedding[...].data.shape == (40, 16)


def test_fp8_weights_with_fp8_activations(rng):
    batches = [shifted(rng, 8, 32)]
    parity_errors(MLP(nnx.Rngs(0)), rules_for(FP8_CH, FP8_ACTS), shifted(rng, 8, 32), batches)
    parity_errors(
        Attention(nnx.Rngs(0)),
        rules_for(QuantSpec(dtype="float8_e4m3fn"), FP8_ACTS),
        shifted(rng, 2, 3, 32),
        [shifted(rng, 2, 3, 32)],
    )


def test_weight_only_int4_mxfp4_nvfp4(rng):
    weights = [
        INT4_CH,
        QuantSpec(dtype="mxfp4", granularity="per_group", axis=0),
        QuantSpec(dtype="nvfp4", granularity="per_group", axis=0),
        INT4_G16,
    ]
    rules = [Rule(path=f"layers/{i}", weights=w) for i, w in enumerate(weights)]
    _, served = parity_errors(MLP(nnx.Rngs(0)), rules, shifted(rng, 8, 32))
    for layer in served.layers:
        q = layer.kernel[...]
        assert q.data.dtype == jnp.uint8 and q.data.shape[-1] * 2 == q.shape[-1]


# --- the integer path runs on integers ----------------------------------------------------------

INT_DOT = re.compile(
    r"stablehlo\.dot_general .*: \(tensor<[0-9x]+xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>"
)
INT_CONV = re.compile(
    r"stablehlo\.convolution.*: \(tensor<[0-9x]+xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>"
)


def lowered_text(model, x):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()


@pytest.mark.parametrize(
    ("model", "weights", "acts", "x_shape", "pattern"),
    [
        (MLP, INT4_G16, INT8_ACTS[:1] * 4, (4, 32), INT_DOT),
        (CNN, INT4_CH, [(A8_TENSOR, "dynamic")] * 4, (1, 12, 12, 4), INT_CONV),
    ],
    ids=["mlp", "cnn"],
)
def test_serve_lowers_to_int8_contractions(model, weights, acts, x_shape, pattern):
    q = qjax.nn.quantize_model(model(nnx.Rngs(0)), rules_for(weights, acts))
    x = jnp.ones(x_shape, jnp.float32)
    served_hlo = lowered_text(qjax.nn.convert(q), x)
    assert len(pattern.findall(served_hlo)) >= 4, served_hlo[:2000]
    assert not pattern.search(lowered_text(q, x))  # the simulated qat forward contracts floats
    if model is MLP:  # QAT with an integer forward contracts in int8 as well
        q_int = qjax.nn.quantize_model(model(nnx.Rngs(0)), rules_for(weights, acts, integer_forward=True))
        assert len(pattern.findall(lowered_text(q_int, x))) >= 4


# --- stored weights ----------------------------------------------------------------------------


def test_converted_kernels_are_packed_quantized_weights():
    weights = [INT8_CH, INT4_CH, INT4_G16, INT4_CH]
    rules = [Rule(path=f"layers/{i}", weights=w) for i, w in enumerate(weights)]
    q = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), rules)
    served = qjax.nn.convert(q)
    assert all(isinstance(layer.kernel, nnx.Param) for layer in q.layers)  # convert copies
    stored = nnx.to_flat_state(nnx.state(served, QuantizedWeight))
    assert sorted(path for path, _ in stored) == [("layers", i, "kernel") for i in range(4)]
    params = sorted(path for path, _ in nnx.to_flat_state(nnx.state(served, nnx.Param)))
    assert params == [("layers", i, "bias") for i in range(4)]
    sizes = {r["path"]: r.get("weight_bytes") for r in qjax.nn.summary(served)}
    for i, (layer, spec) in enumerate(zip(served.layers, weights, strict=True)):
        assert isinstance(layer.kernel, QuantizedWeight)
        k, n = q.layers[i].kernel.shape
        w = layer.kernel[...]
        assert isinstance(w, qjax.QArray) and w.shape == (k, n)
        bits = int(spec.dtype[3:])
        assert w.data.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
        assert w.data.shape == (k, n * bits // 8)
        scales = n * (k // spec.group_size if spec.group_size else 1)
        assert w.nbytes == k * n * bits // 8 + 4 * scales == sizes[f"layers/{i}"]
        eager = qjax.quantize(q.layers[i].kernel[...], spec)  # convert compiles it: the same bits
        assert jnp.array_equal(w.data, eager.data) and jnp.array_equal(w.scale, eager.scale)


def test_conv_serve_limits_are_clear_errors_at_convert():
    grouped = QuantSpec(dtype="int4", granularity="per_group", axis=2, group_size=4)
    cases = [
        (grouped, A8_TENSOR, r"layer 'layers/0': a convolution's kernel scales .* grid \(3, 3, 1, 8\)"),
        (INT8_CH, A8_TOKEN, r"layer 'layers/0': a convolution's input needs one scale .* 'per_token'"),
    ]
    for weights, acts, message in cases:
        rules = [Rule(path="layers/[0-3]", weights=weights, activations=acts)]
        with pytest.raises(ValueError, match=message):
            qjax.nn.quantize_model(CNN(nnx.Rngs(0)), rules, mode="convert")
