"""Per-layer diagnostics (``qjax/nn/diagnostics.py``) against float64 numpy.

Every reference is written by hand: quantizers (symmetric, percentile or min-max ranges), the
layers' forward passes (matmul, a 3x3 'SAME' convolution as nine shifted matmuls), SQNR, clipping,
channel outliers; kurtosis from scipy.
"""

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import qjax
from qjax import QuantSpec
from qjax.nn import Rule, format_table, layer_diagnostics

W4_CH_P90 = QuantSpec(
    dtype="int4", granularity="per_channel", axis=-1, calibration="percentile", percentile=90.0
)
W4 = QuantSpec(dtype="int4")
W8_CH = QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
A8_P99 = QuantSpec(dtype="int8", calibration="percentile", percentile=99.0)
A8 = QuantSpec(dtype="int8")
OUTLIER_CHANNEL, OUTLIER_GAIN = 5, 25.0
BIAS = {"bias_init": nnx.initializers.normal(1.0)}  # non-zero biases: outputs include them


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(12, 16, **BIAS, rngs=rngs)
        self.fc2 = nnx.Linear(16, 10, **BIAS, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), **BIAS, rngs=rngs)
        self.conv2 = nnx.Conv(4, 5, (3, 3), **BIAS, rngs=rngs)

    def __call__(self, x):
        return self.conv2(jax.nn.relu(self.conv1(x)))


# --- float64 references ----------------------------------------------------------------------------


def _f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _symmetric(x: np.ndarray, amax: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Q(x), |round(x / S)| > qmax)`` for symmetric quantization with S = amax / qmax
    (broadcast): the elements whose code clipping changes."""
    qmax = 2 ** (bits - 1) - 1
    s = amax / qmax
    return np.clip(np.round(x / s), -qmax, qmax) * s, np.abs(np.round(x / s)) > qmax


def _sqnr(ref: np.ndarray, approx: np.ndarray) -> float:
    return 10 * math.log10(np.sum(ref**2) / np.sum((approx - ref) ** 2))


def _conv_same(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3x3 stride-1 'SAME' convolution, NHWC x HWIO, as nine shifted matmuls."""
    h, wd = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(xp[:, i : i + h, j : j + wd, :] @ w[i, j] for i in range(3) for j in range(3)) + b


def _outliers(x: np.ndarray) -> tuple[float, float]:
    cmax = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)
    return cmax.max() / np.median(cmax), np.mean(cmax > 6 * np.median(cmax))


def _input(rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(64, 12))
    x[:, OUTLIER_CHANNEL] *= OUTLIER_GAIN
    return x


def _rows(rows: list[dict]) -> dict[str, dict]:
    return {r["path"]: r for r in rows}


# --- MLP -------------------------------------------------------------------------------------------


def test_mlp_diagnostics_match_numpy(rng):
    model = MLP(nnx.Rngs(0))
    rules = [Rule(path="fc1", weights=W4_CH_P90, activations=A8_P99), Rule(path="fc2", weights=W4)]
    q = qjax.nn.quantize_model(model, rules)
    x = _input(rng)
    rows = _rows(layer_diagnostics(q, model, jnp.asarray(x, jnp.float32)))
    assert list(rows) == ["fc1", "fc2"]

    w1, b1 = _f64(model.fc1.kernel[...]), _f64(model.fc1.bias[...])
    w2, b2 = _f64(model.fc2.kernel[...]), _f64(model.fc2.bias[...])
    x = _f64(np.float32(x))
    # fc1: int4 per output channel, |w| range at the 90th percentile; int8 input at the 99th.
    w1q, w1_out = _symmetric(w1, np.percentile(np.abs(w1), 90, axis=0, keepdims=True), 4)
    xq, x_out = _symmetric(x, np.percentile(np.abs(x), 99), 8)
    y1 = x @ w1 + b1
    r = rows["fc1"]
    assert (r["layer"], r["weights"], r["activations"]) == ("Linear", "int4", "int8")
    assert r["weight_sqnr_db"] == pytest.approx(_sqnr(w1, w1q), abs=1e-3)
    assert 0 < r["weight_clip_ratio"] == pytest.approx(np.mean(w1_out), abs=1e-12)
    assert 0 < r["act_clip_ratio"] == pytest.approx(np.mean(x_out), abs=1e-12)
    assert r["output_sqnr_db"] == pytest.approx(_sqnr(y1, xq @ w1q + b1), abs=1e-3)
    ratio, share = _outliers(x)
    assert r["act_max_over_median"] == pytest.approx(ratio, rel=1e-6) and ratio > 6
    assert r["act_outlier_channels"] == pytest.approx(share) == pytest.approx(1 / 12)
    assert r["act_kurtosis"] == pytest.approx(scipy.stats.kurtosis(x.reshape(-1), fisher=False), rel=1e-6)

    # fc2: weight-only int4 per tensor, min-max (nothing clips); its input is the float model's.
    h = np.maximum(y1, 0.0)
    w2q, w2_out = _symmetric(w2, np.abs(w2).max(), 4)
    assert not w2_out.any()
    r = rows["fc2"]
    assert r["activations"] is None and r["act_clip_ratio"] is None
    assert r["weight_clip_ratio"] == 0.0
    assert r["weight_sqnr_db"] == pytest.approx(_sqnr(w2, w2q), abs=1e-3)
    assert r["output_sqnr_db"] == pytest.approx(_sqnr(h @ w2 + b2, h @ w2q + b2), abs=1e-3)
    ratio, share = _outliers(h)
    assert r["act_max_over_median"] == pytest.approx(ratio, rel=1e-5)
    assert r["act_outlier_channels"] == pytest.approx(share)
    assert r["act_kurtosis"] == pytest.approx(scipy.stats.kurtosis(h.reshape(-1), fisher=False), rel=1e-5)


def test_static_activation_clipping_uses_the_calibrated_range(rng):
    model = MLP(nnx.Rngs(1))
    rule = Rule(path="fc1", weights=W4, activations=A8, activation_scale="static")
    q = qjax.nn.quantize_model(model, [rule], mode="calibrate")
    calib = 0.5 * _input(rng)
    q = qjax.nn.calibrate(q, [jnp.asarray(calib, jnp.float32)])
    x = _input(rng)
    rows = _rows(layer_diagnostics(q, model, jnp.asarray(x, jnp.float32)))
    # Static symmetric range: +-max|calibration input| (S = max / 127): wider inputs clip.
    expected = np.mean(np.abs(np.float32(x)) > 127 * np.float32(np.abs(np.float32(calib)).max() / 127))
    assert 0 < rows["fc1"]["act_clip_ratio"] == pytest.approx(expected, abs=1e-12)
    assert list(rows) == ["fc1"]


def test_serve_mode_reports_the_stored_weights(rng):
    model = MLP(nnx.Rngs(2))
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W8_CH)])
    x = jnp.asarray(_input(rng), jnp.float32)
    qat, served = layer_diagnostics(q, model, x), layer_diagnostics(qjax.nn.convert(q), model, x)
    for a, b in zip(qat, served, strict=True):
        assert a["weight_sqnr_db"] == b["weight_sqnr_db"] and a["weight_clip_ratio"] == b["weight_clip_ratio"]
        assert a["output_sqnr_db"] == pytest.approx(b["output_sqnr_db"], abs=1e-2)
        assert a["act_kurtosis"] == b["act_kurtosis"]


# --- CNN -------------------------------------------------------------------------------------------


def test_cnn_diagnostics_match_numpy(rng):
    model = CNN(nnx.Rngs(3))
    rules = [Rule(path="conv1", weights=W4), Rule(path="conv2", weights=W8_CH, activations=A8)]
    q = qjax.nn.quantize_model(model, rules)
    x = np.float32(rng.normal(size=(3, 6, 6, 3)))
    rows = _rows(layer_diagnostics(q, model, jnp.asarray(x)))

    k1, b1 = _f64(model.conv1.kernel[...]), _f64(model.conv1.bias[...])
    k2, b2 = _f64(model.conv2.kernel[...]), _f64(model.conv2.bias[...])
    x = _f64(x)
    k1q, _ = _symmetric(k1, np.abs(k1).max(), 4)
    k2q, _ = _symmetric(k2, np.abs(k2).max(axis=(0, 1, 2), keepdims=True), 8)
    y1 = _conv_same(x, k1, b1)
    h = np.maximum(y1, 0.0)
    hq, h_out = _symmetric(h, np.abs(h).max(), 8)
    assert not h_out.any()

    r1, r2 = rows["conv1"], rows["conv2"]
    assert r1["layer"] == "Conv" and r1["weight_clip_ratio"] == 0.0 and r1["act_clip_ratio"] is None
    assert r1["weight_sqnr_db"] == pytest.approx(_sqnr(k1, k1q), abs=1e-3)
    assert r1["output_sqnr_db"] == pytest.approx(_sqnr(y1, _conv_same(x, k1q, b1)), abs=1e-3)
    assert r2["weight_sqnr_db"] == pytest.approx(_sqnr(k2, k2q), abs=1e-3)
    assert r2["act_clip_ratio"] == 0.0
    assert r2["output_sqnr_db"] == pytest.approx(
        _sqnr(_conv_same(h, k2, b2), _conv_same(hq, k2q, b2)), abs=1e-3
    )
    ratio, share = _outliers(h)
    assert r2["act_max_over_median"] == pytest.approx(ratio, rel=1e-5)
    assert r2["act_outlier_channels"] == pytest.approx(share)
    assert r2["act_kurtosis"] == pytest.approx(scipy.stats.kurtosis(h.reshape(-1), fisher=False), rel=1e-5)


# --- Einsum --------------------------------------------------------------------------------------


def test_einsum_output_includes_its_broadcast_bias(rng):
    model = nnx.Sequential(nnx.Einsum("btd,dnh->btnh", (8, 2, 3), (2, 3), **BIAS, rngs=nnx.Rngs(6)))
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W4)])
    x = np.float32(rng.normal(size=(2, 5, 8)))
    (row,) = layer_diagnostics(q, model, jnp.asarray(x))
    k, b = _f64(model.layers[0].kernel[...]), _f64(model.layers[0].bias[...])
    assert np.abs(b).max() > 0.1
    kq, _ = _symmetric(k, np.abs(k).max(), 4)
    y, y_hat = (np.einsum("btd,dnh->btnh", _f64(x), w) + b for w in (k, kq))
    assert row["layer"] == "Einsum"
    assert row["weight_sqnr_db"] == pytest.approx(_sqnr(k, kq), abs=1e-3)
    assert row["output_sqnr_db"] == pytest.approx(_sqnr(y, y_hat), abs=1e-3)


# --- table, side effects, errors -------------------------------------------------------------------


def test_format_table_is_markdown():
    rows = [
        {"path": "a", "weight_sqnr_db": 12.345678, "act_clip_ratio": None},
        {"path": "b/0", "weight_sqnr_db": math.inf, "act_clip_ratio": 1 / 12},
    ]
    assert format_table(rows).splitlines() == [
        "| path | weight_sqnr_db | act_clip_ratio |",
        "|---|---|---|",
        "| a | 12.35 | - |",
        "| b/0 | inf | 0.08333 |",
    ]
    assert format_table(rows, columns=["path"], digits=2).splitlines()[2] == "| a |"


def test_diagnostics_leave_both_models_unchanged(rng):
    model = MLP(nnx.Rngs(4))
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W4, activations=A8, weight_estimator="lsq")])
    before = jax.tree.map(np.asarray, (nnx.state(model), nnx.state(q)))
    layer_diagnostics(q, model, jnp.asarray(_input(rng), jnp.float32))
    after = jax.tree.map(np.asarray, (nnx.state(model), nnx.state(q)))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert model.fc1.dot_general is jax.lax.dot_general
    assert [type(op).__name__ for _, _, op in qjax.nn.quantized_ops(q)] == ["QuantizedOp"] * 2
    assert q.fc1.dot_general is qjax.nn.quantized_ops(q)[0][2]


def test_diagnostics_errors(rng):
    model = MLP(nnx.Rngs(5))
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W4, activations=A8)])
    x = jnp.asarray(_input(rng), jnp.float32)
    with pytest.raises(ValueError, match=r"layer 'fc1' was called under a JAX transformation"):
        layer_diagnostics(q, model, x, forward=nnx.jit(lambda m, b: m(b)))
    other = nnx.Sequential(nnx.Linear(12, 10, rngs=nnx.Rngs(0)))
    with pytest.raises(
        ValueError, match=r"layer 'fc1' was called 1 time\(s\) in qmodel but never in float_model"
    ):
        layer_diagnostics(q, other, x, forward=lambda m, b: m(b))
    with pytest.raises(ValueError, match=r"qmodel has no quantized layers"):
        layer_diagnostics(model, model, x)
    qjax.nn.set_mode(q, "calibrate")
    with pytest.raises(ValueError, match=r"layer 'fc1' is in mode 'calibrate'"):
        layer_diagnostics(q, model, x)
