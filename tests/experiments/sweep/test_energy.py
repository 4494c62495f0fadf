"""experiments.sweep.energy against hand counts: storage bytes, bits per weight, MACs and pJ."""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from experiments.sweep.energy import Contraction, einsum_macs, forward_energy, model_storage

FP32, FP16 = 3.7 + 0.9, 1.1 + 0.4
PJ_PER_BYTE = 8 * 640 / 32


def _numpy_init(key, shape, dtype=jnp.float32):
    """Random kernels from numpy: no per-shape compilation of jax.random in eager tests."""
    seed = int(np.asarray(jax.random.key_data(key)).sum())
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 0.5, size=shape), dtype)


INIT = {"kernel_init": _numpy_init}


class TinyMLP(nnx.Module):
    """5 -> 7 -> 3."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(5, 7, **INIT, rngs=rngs)
        self.fc2 = nnx.Linear(7, 3, **INIT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(x)))


class TinyConv(nnx.Module):
    """(6, 6, 2) -> conv 3x3 SAME (3) -> conv 3x3 VALID stride 2 (4) -> grouped 1x1 (4, 2 groups)
    -> linear 16 -> 2."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(2, 3, (3, 3), **INIT, rngs=rngs)
        self.conv2 = nnx.Conv(3, 4, (3, 3), strides=(2, 2), padding="VALID", **INIT, rngs=rngs)
        self.group = nnx.Conv(4, 4, (1, 1), feature_group_count=2, **INIT, rngs=rngs)
        self.head = nnx.Linear(16, 2, **INIT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = self.group(x)
        return self.head(x.reshape(x.shape[0], -1))


# Hand counts per example.
MLP_MACS = {"fc1": 5 * 7, "fc2": 7 * 3}
CONV_MACS = {
    "conv1": 6 * 6 * 3 * (3 * 3 * 2),  # SAME: 6x6 outputs, 18 products each
    "conv2": 2 * 2 * 4 * (3 * 3 * 3),  # VALID stride 2: (6 - 3) // 2 + 1 = 2
    "group": 2 * 2 * 4 * (1 * 1 * 2),  # 2 input channels per group
    "head": 16 * 2,
}

W8 = qjax.QuantSpec(dtype="int8")
W4_CHANNEL = qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
A8 = qjax.QuantSpec(dtype="int8")


def _quantized(model, weights, activations, **rule):
    return qjax.nn.quantize_model(
        model, [qjax.nn.Rule(path=".*", weights=weights, activations=activations, **rule)]
    )


def _mlp():
    return TinyMLP(rngs=nnx.Rngs(0))


def _x_mlp(n=4):
    return jnp.asarray(np.random.default_rng(1).normal(size=(n, 5)), jnp.float32)


def _x_conv(n=3):
    return jnp.asarray(np.random.default_rng(2).normal(size=(n, 6, 6, 2)), jnp.float32)


# -- storage ---------------------------------------------------------------------------------------

BIAS_BYTES_MLP = (7 + 3) * 4


def test_float_storage():
    s = model_storage(_mlp())
    assert s["size_bytes"] == (5 * 7 + 7 + 7 * 3 + 3) * 4
    assert s["bits_per_weight"] == 32.0
    assert s["kernel_elements"] == 56
    assert {p["path"] for p in s["params"]} == {"fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias"}


@pytest.mark.parametrize("converted", [False, True])
def test_w8a8_per_tensor_storage(converted):
    q = _quantized(_mlp(), W8, A8)
    s = model_storage(qjax.nn.convert(q) if converted else q)
    kernels = (35 + 4) + (21 + 4)  # one int8 per weight + one float32 scale per tensor
    assert s["kernel_bytes"] == kernels
    assert s["size_bytes"] == kernels + BIAS_BYTES_MLP  # the QuantStats histograms are not counted
    assert s["bits_per_weight"] == pytest.approx(8 * kernels / 56)


@pytest.mark.parametrize("converted", [False, True])
def test_w4_per_channel_storage_is_packed(converted):
    q = _quantized(_mlp(), W4_CHANNEL, A8)
    s = model_storage(qjax.nn.convert(q) if converted else q)
    # (5, 7): 7 int4 per row pack into 4 bytes (one pad nibble) + 7 scales; (7, 3): 2 bytes per row + 3 scales
    fc1, fc2 = 5 * 4 + 7 * 4, 7 * 2 + 3 * 4
    assert s["kernel_bytes"] == fc1 + fc2
    assert s["size_bytes"] == fc1 + fc2 + BIAS_BYTES_MLP
    assert s["bits_per_weight"] == pytest.approx(8 * (fc1 + fc2) / 56)
    rows = {p["path"]: p for p in s["params"]}
    assert rows["fc1/kernel"]["dtype"] == "int4" and rows["fc1/kernel"]["elements"] == 35


def test_asymmetric_storage():
    asym = qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1, symmetric=False)
    s = model_storage(_quantized(_mlp(), asym, None))
    # int8 values + per-channel float32 scales + int8 zero points
    assert s["kernel_bytes"] == (35 + 7 * 4 + 7) + (21 + 3 * 4 + 3)


@pytest.mark.parametrize("converted", [False, True])
def test_learned_weight_scale_is_not_counted_twice(converted):
    q = _quantized(
        _mlp(), qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1), None, weight_estimator="lsq"
    )
    assert any(op.weight_scale is not None for _, _, op in qjax.nn.quantized_ops(q))
    s = model_storage(qjax.nn.convert(q) if converted else q)
    assert s["size_bytes"] == (35 + 7 * 4) + (21 + 3 * 4) + BIAS_BYTES_MLP


@pytest.mark.parametrize("converted", [False, True])
def test_kmeans_codebook_and_indices_are_counted_once(converted):
    q = _quantized(_mlp(), qjax.QuantSpec(dtype="kmeans2"), None, weight_estimator="kmeans_finetune")
    assert any(op.centroids is not None for _, _, op in qjax.nn.quantized_ops(q))
    s = model_storage(qjax.nn.convert(q) if converted else q)
    # 2-bit indices packed 4 per byte along the last axis + a 4-entry float32 codebook per tensor
    fc1, fc2 = 5 * 2 + 4 * 4, 7 * 1 + 4 * 4
    assert s["kernel_bytes"] == fc1 + fc2
    assert s["size_bytes"] == fc1 + fc2 + BIAS_BYTES_MLP


def test_a_pinned_weight_grid_is_not_counted_twice():
    q = _quantized(_mlp(), W4_CHANNEL, None)
    before = model_storage(q)["size_bytes"]
    for _, layer, _op in qjax.nn.quantized_ops(q):
        kernel = layer.kernel[...]
        qp = qjax.calibrate(kernel, W4_CHANNEL)
        qjax.nn.pin_weight_qparams(layer, qjax.quantize_dequantize(kernel, W4_CHANNEL, qparams=qp), qp)
    assert model_storage(q)["size_bytes"] == before


def test_static_scales_are_counted_statistics_are_not():
    q = _quantized(_mlp(), W8, A8, activation_scale="static")
    before = model_storage(q)["size_bytes"]
    q = qjax.nn.calibrate(q, [_x_mlp()])
    after = model_storage(q)["size_bytes"]
    assert after - before == 2 * 4  # one float32 static scale per layer
    assert model_storage(qjax.nn.convert(q))["size_bytes"] == after


def test_partly_float_model():
    q = qjax.nn.quantize_model(_mlp(), [qjax.nn.Rule(path="fc1", weights=W8), qjax.nn.Rule(path=".*")])
    s = model_storage(q)
    assert s["kernel_bytes"] == (35 + 4) + 21 * 4
    assert s["bits_per_weight"] == pytest.approx(8 * (39 + 84) / 56)


# -- MACs and energy -------------------------------------------------------------------------------


def _check_energy(e, macs, pj_per_mac, size_bytes, arithmetic):
    assert {row["path"]: row["macs"] for row in e["layers"]} == macs
    assert e["macs"] == sum(macs.values())
    assert e["compute_pj"] == pytest.approx(sum(macs.values()) * pj_per_mac, rel=1e-12)
    assert e["memory_pj"] == pytest.approx(size_bytes * PJ_PER_BYTE, rel=1e-12)
    assert e["energy_pj"] == pytest.approx(e["compute_pj"] + e["memory_pj"], rel=1e-12)
    assert e["size_bytes"] == size_bytes
    assert {row["arithmetic"] for row in e["layers"]} == {arithmetic}
    assert sum(row["compute_pj"] for row in e["layers"]) == pytest.approx(e["compute_pj"])


@pytest.mark.parametrize(
    ("weights", "activations", "pj", "arithmetic"),
    [
        (None, None, FP32, "float32"),
        (W8, A8, 0.2 + 0.1, "int8 x int8"),
        (W4_CHANNEL, A8, 0.2 * 32 / 64 + 0.1, "int4 x int8"),
        (W4_CHANNEL, None, FP32, "float32"),  # weight-only: computes in float
        (qjax.QuantSpec(dtype="int2"), qjax.QuantSpec(dtype="int4"), 0.2 * 8 / 64 + 0.1, "int2 x int4"),
        (qjax.QuantSpec(dtype="float8_e4m3fn"), qjax.QuantSpec(dtype="float8_e4m3fn"), FP16, None),
    ],
)
def test_mlp_energy(weights, activations, pj, arithmetic):
    model = _mlp()
    if weights is not None:
        model = _quantized(model, weights, activations)
    e = forward_energy(model, _x_mlp(4))
    size = model_storage(model)["size_bytes"]
    arithmetic = arithmetic or "float8_e4m3fn x float8_e4m3fn (fp16 figures)"
    _check_energy(e, MLP_MACS, pj, size, arithmetic)
    assert {row["path"]: row["bytes"] for row in e["layers"]} == {
        "fc1": sum(p["bytes"] for p in model_storage(model)["params"] if p["path"].startswith("fc1/")),
        "fc2": sum(p["bytes"] for p in model_storage(model)["params"] if p["path"].startswith("fc2/")),
    }


def test_mlp_float_total_by_hand():
    e = forward_energy(_mlp(), _x_mlp(1))
    assert e["energy_pj"] == pytest.approx(56 * 4.6 + (35 + 7 + 21 + 3) * 32 * 20)


@pytest.mark.parametrize(
    ("weights", "activations", "pj", "converted"),
    [
        (None, None, FP32, False),
        (W8, A8, 0.3, False),
        (W4_CHANNEL, A8, 0.2, True),
        (W4_CHANNEL, None, FP32, True),
    ],
)
def test_conv_energy(weights, activations, pj, converted):
    model = TinyConv(rngs=nnx.Rngs(0))
    if weights is not None:
        model = _quantized(model, weights, activations)
        model = qjax.nn.convert(model) if converted else model
    e = forward_energy(model, _x_conv(3))
    _check_energy(e, CONV_MACS, pj, model_storage(model)["size_bytes"], e["layers"][0]["arithmetic"])
    assert {row["layer"] for row in e["layers"]} == {"Conv", "Linear"}


def test_energy_leaves_the_model_unchanged_and_needs_no_calibration():
    q = _quantized(_mlp(), W8, A8, activation_scale="static")  # static scales, never calibrated
    x = _x_mlp()
    e = forward_energy(q, x)
    assert e["macs"] == 56
    ops = qjax.nn.quantized_ops(q)
    assert [op.mode for _, _, op in ops] == ["qat", "qat"]
    assert all(int(op.stats.get_value()["count"]) == 0 for _, _, op in ops)
    with pytest.raises(ValueError, match="no calibration"):
        q(x)


def test_shared_layer_forward_and_batch_size():
    model = _mlp()
    twice = forward_energy(model, _x_mlp(2), forward=lambda m, b: m.fc2(m.fc1(m.fc1(b)[:, :5])))
    assert {row["path"]: row["macs"] for row in twice["layers"]} == {"fc1": 70, "fc2": 21}
    labelled = forward_energy(model, (_x_mlp(2), jnp.zeros((2,), jnp.int32)), forward=lambda m, b: m(b[0]))
    assert labelled["macs"] == 56
    assert forward_energy(model, _x_mlp(2), batch_size=4)["macs"] == 28
    assert forward_energy(model, _x_mlp(2), batch_size=3)["macs"] == pytest.approx(112 / 3)


class TinyLM(nnx.Module):
    """Embed 11 x 6 -> einsum btd,dhk->bthk (2 heads of 3)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(11, 6, embedding_init=_numpy_init, rngs=rngs)
        self.proj = nnx.Einsum("btd,dhk->bthk", (6, 2, 3), (2, 3), **INIT, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.proj(self.embed(tokens))


def test_einsum_layer_and_embedding():
    model = TinyLM(rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 5), jnp.int32)
    e = forward_energy(model, tokens)
    assert [row["path"] for row in e["layers"]] == ["proj"]  # a lookup is no MAC
    assert e["macs"] == 5 * 6 * 2 * 3  # per sequence: t d h k
    rules = [
        qjax.nn.Rule(path="embed", weights=W4_CHANNEL),
        qjax.nn.Rule(path="proj", weights=W8, activations=A8),
    ]
    for q in (qjax.nn.quantize_model(model, rules), qjax.nn.quantize_model(model, rules, mode="convert")):
        e = forward_energy(q, tokens)
        assert e["macs"] == 180 and e["compute_pj"] == pytest.approx(180 * 0.3)
        s = model_storage(q)
        # table (11, 6) int4 per column: 3 bytes per row + 6 scales; einsum kernel int8 + 1 scale; bias
        assert s["kernel_bytes"] == (11 * 3 + 6 * 4) + (36 + 4)
        assert s["size_bytes"] == s["kernel_bytes"] + 6 * 4


def test_batchnorm_statistics_are_stored_and_train_mode_is_kept():
    class ConvBN(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv = nnx.Conv(2, 4, (1, 1), use_bias=False, **INIT, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.bn(self.conv(x))

    model = ConvBN(rngs=nnx.Rngs(0))
    assert model_storage(model)["size_bytes"] == (2 * 4 + 4 * 4) * 4  # kernel, scale, bias, mean, var
    mean = np.asarray(model.bn.mean[...]).copy()
    assert forward_energy(model, _x_conv(2) + 3.0)["macs"] == 6 * 6 * 4 * 2
    assert model.bn.use_running_average is False
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), mean)


def test_einsum_macs_against_a_brute_force_count():
    rng = np.random.default_rng(0)
    for eq, a, b in [
        ("ij,jk->ik", (3, 4), (4, 5)),
        ("bij,bjk->bik", (2, 3, 4), (2, 4, 5)),
        ("...d,dh->...h", (2, 3, 4), (4, 6)),
        ("ij,jk", (3, 4), (4, 5)),  # implicit output "ik"
        ("ij,kj->i", (3, 4), (5, 4)),  # k summed out too
    ]:
        x, y = rng.normal(size=a), rng.normal(size=b)
        out = np.einsum(eq, x, y)
        ones = np.einsum(eq, np.ones(a), np.ones(b))  # each output element = its number of products
        assert einsum_macs(eq, a, b, out.size) == int(ones.sum()), eq


def test_dot_general_with_batch_dims_and_conv_layouts():
    lhs, rhs = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    dn = (((2,), (1,)), ((0,), (0,)))
    out = jax.lax.dot_general(lhs, rhs, dn)
    assert Contraction("dot_general", lhs.shape, rhs.shape, out.shape, dn).macs == 2 * 3 * 4 * 5
    # OIHW kernel: 5 output channels, 3 input channels, 2x2 window; NCHW 4x4 input, VALID: 3x3 outputs
    x, w = jnp.ones((1, 3, 4, 4)), jnp.ones((5, 3, 2, 2))
    cdn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NCHW", "OIHW", "NCHW"))
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=cdn)
    assert Contraction("conv", x.shape, w.shape, y.shape, cdn).macs == 3 * 3 * 5 * (3 * 2 * 2)


def test_errors():
    with pytest.raises(ValueError, match="no array with a batch axis"):
        forward_energy(_mlp(), {"x": 1.0})
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        forward_energy(_mlp(), _x_mlp(), batch_size=0)

    class NoLayers(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3,)))

    with pytest.raises(ValueError, match="no Linear, Conv, Einsum or Embed kernel"):
        model_storage(NoLayers())
