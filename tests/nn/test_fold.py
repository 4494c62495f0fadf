"""Batch-norm folding and bias correction (``qjax/nn/fold.py``).

References: the fold formula in float64 numpy; the folded model against the unfolded model in
inference mode; the bias correction vector against :math:`(\\hat W - W)^\\top \\mathbb{E}[x]` in
float64 numpy, with :math:`\\hat W` quantized by hand; corrected layers against the definition
(mean output error over the calibration data is zero).
"""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec
from qjax.nn import FoldedBatchNorm, Rule, bias_correction, fold_batchnorm, fold_batchnorm_params

W3 = QuantSpec(dtype="int3")
W4_CH = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
A8 = QuantSpec(dtype="int8")
apply = nnx.jit(lambda m, x: m(x))


class ConvNet(nnx.Module):
    """conv -> bn -> relu -> [conv -> bn] (the second pair inside an nnx.List)."""

    def __init__(self, use_bias: bool, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), use_bias=use_bias, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.block = nnx.List([nnx.Conv(6, 4, (3, 3), strides=2, use_bias=use_bias, rngs=rngs)])
        self.block.append(nnx.BatchNorm(4, use_scale=False, use_bias=False, rngs=rngs))

    def __call__(self, x):
        return self.block[1](self.block[0](jax.nn.relu(self.bn(self.conv(x)))))


def _linear_net(use_bias: bool, rngs: nnx.Rngs) -> nnx.Sequential:
    return nnx.Sequential(
        nnx.Linear(5, 8, use_bias=use_bias, rngs=rngs),
        nnx.BatchNorm(8, epsilon=1e-3, rngs=rngs),
        jax.nn.relu,
        nnx.Linear(8, 3, rngs=rngs),
    )


def _randomize_stats(model: nnx.Module, rng: np.random.Generator) -> None:
    """Running statistics, scales and offsets far from the identity (negative scales included)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    for _, bn in nnx.iter_modules(model):
        if isinstance(bn, nnx.BatchNorm):
            n = bn.num_features
            bn.mean.set_value(f32(rng.normal(0.0, 0.5, n)))
            bn.var.set_value(f32(rng.uniform(0.2, 3.0, n)))
            if bn.scale is not None:
                bn.scale.set_value(f32(rng.normal(0.0, 1.5, n)))
            if bn.bias is not None:
                bn.bias.set_value(f32(rng.normal(0.0, 1.0, n)))


def _build(kind: str, use_bias: bool, rng: np.random.Generator):
    if kind == "conv":
        model: nnx.Module = ConvNet(use_bias, nnx.Rngs(0))
        pairs = [("conv", "bn"), ("block/0", "block/1")]
        x = rng.normal(size=(4, 9, 9, 3))
    else:
        model, pairs, x = (
            _linear_net(use_bias, nnx.Rngs(0)),
            [("layers/0", "layers/1")],
            rng.normal(size=(16, 5)),
        )
    _randomize_stats(model, rng)
    model.eval()
    return model, pairs, jnp.asarray(x, jnp.float32)


# --- folding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("has_affine", [True, False])
def test_fold_formula_matches_float64(rng, has_bias, has_affine):
    kernel, bias = rng.normal(size=(3, 3, 4, 6)), rng.normal(size=6)
    mean, var = rng.normal(size=6), rng.uniform(0.1, 4.0, 6)
    scale, offset, eps = rng.normal(size=6), rng.normal(size=6), 1e-3
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    k, b = fold_batchnorm_params(
        f32(kernel),
        f32(bias) if has_bias else None,
        f32(mean),
        f32(var),
        f32(scale) if has_affine else None,
        f32(offset) if has_affine else None,
        eps,
    )
    s = (scale if has_affine else 1.0) / np.sqrt(var + eps)
    b_ref = ((bias if has_bias else 0.0) - mean) * s + (offset if has_affine else 0.0)
    assert k.dtype == jnp.float32 and b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(k, np.float64), kernel * s, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(b, np.float64), b_ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_folded_model_equals_inference_mode_model(rng, kind, use_bias):
    model, pairs, x = _build(kind, use_bias, rng)
    ref = apply(model, x)
    before = jax.tree.map(np.asarray, nnx.state(model))
    folded = fold_batchnorm(model, pairs)
    out = apply(folded, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # The input model is untouched; the folded one has identities and biases where it should.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)
    nodes = {"/".join(map(str, p)): n for p, n in nnx.iter_modules(folded)}
    for layer_path, bn_path in pairs:
        assert isinstance(nodes[bn_path], FoldedBatchNorm)
        assert nodes[layer_path].use_bias and nodes[layer_path].bias is not None
        assert nodes[layer_path].bias.shape == (nodes[layer_path].kernel.shape[-1],)
    assert not any(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_modules(folded))
    # Train / eval switches and views still work on the folded model and change nothing.
    folded.train()
    np.testing.assert_array_equal(np.asarray(apply(folded, x)), np.asarray(out))
    view = nnx.view(folded, use_running_average=True)
    np.testing.assert_array_equal(np.asarray(apply(view, x)), np.asarray(out))


def test_fold_then_quantize_quantizes_the_folded_kernel(rng):
    model, pairs, x = _build("linear", True, rng)
    folded = fold_batchnorm(model, pairs)
    q = qjax.nn.quantize_model(folded, [Rule(path="layers/0", weights=W4_CH)])
    k = folded.layers[0].kernel[...]
    h = x @ qjax.quantize_dequantize(k, W4_CH) + folded.layers[0].bias[...][None, :]
    expected = apply(folded.layers[3], jax.nn.relu(h))
    np.testing.assert_allclose(np.asarray(apply(q, x)), np.asarray(expected), rtol=1e-5, atol=1e-6)


def _fold_errors():
    return [
        ([("convv", "bn")], ValueError, r"no module at path 'convv'; did you mean 'conv'\?"),
        ([("bn", "conv")], TypeError, r"module 'bn' is a BatchNorm; expected nnx.Linear or nnx.Conv"),
        ([("conv", "block/0")], TypeError, r"module 'block/0' is a Conv; expected nnx.BatchNorm"),
        ([("block/0", "bn")], ValueError, r"BatchNorm 'bn' has 6 features but layer 'block/0' has 4 outputs"),
        ([("conv", "bn"), ("block/0", "bn")], ValueError, r"BatchNorm 'bn' appears in more than one pair"),
        (("conv", "bn"), TypeError, r"wrap a single pair in a list"),
        ([("conv",)], TypeError, r"pair \('conv',\) must be \(layer_path, batchnorm_path\)"),
    ]


@pytest.mark.parametrize(("pairs", "exc", "match"), _fold_errors())
def test_fold_errors_name_the_path(pairs, exc, match):
    model = ConvNet(True, nnx.Rngs(0))
    with pytest.raises(exc, match=match):
        fold_batchnorm(model, pairs)


def test_fold_refuses_a_quantized_layer():
    model = ConvNet(True, nnx.Rngs(0))
    q = qjax.nn.quantize_model(model, [Rule(path="conv", weights=W4_CH)])
    with pytest.raises(
        ValueError, match=r"layer 'conv' is already quantized; fold batch norms into the float"
    ):
        fold_batchnorm(q, [("conv", "bn")])


def test_fold_refuses_a_channels_first_batchnorm():
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, axis=0, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"BatchNorm 'layers/1' normalizes axis=0"):
        fold_batchnorm(model, [("layers/0", "layers/1")])


# --- bias correction -------------------------------------------------------------------------------


def _quantize_by_hand(w: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric per-tensor min-max quantization in float64: S = max|w| / qmax."""
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(w).max() / qmax
    return np.clip(np.round(w / s), -qmax, qmax) * s


def _batches(rng: np.random.Generator, shape: tuple[int, ...], n: int = 3) -> list[jax.Array]:
    # A clearly non-zero input mean (as after a ReLU): E[x] is what turns weight error into bias.
    return [jnp.asarray(rng.normal(0.8, 1.0, shape), jnp.float32) for _ in range(n)]


@pytest.mark.parametrize("use_bias", [True, False])
def test_bias_correction_of_a_linear_layer_matches_the_math(rng, use_bias):
    model = nnx.Sequential(nnx.Linear(16, 8, use_bias=use_bias, rngs=nnx.Rngs(1)))
    if use_bias:
        model.layers[0].bias.set_value(jnp.asarray(rng.normal(size=8), jnp.float32))
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W3)])
    batches = _batches(rng, (32, 16))
    corrected = bias_correction(q, model, batches)

    w = np.asarray(model.layers[0].kernel[...], np.float64)
    ex = np.mean(np.concatenate([np.asarray(b, np.float64) for b in batches]), axis=0)
    delta = (_quantize_by_hand(w, 3) - w).T @ ex
    assert np.abs(delta).max() > 0.05  # 3-bit weights: the uncorrected shift is large
    b_old = np.asarray(model.layers[0].bias[...], np.float64) if use_bias else np.zeros(8)
    layer = corrected.layers[0]
    assert layer.use_bias and layer.bias is not None
    np.testing.assert_allclose(np.asarray(layer.bias[...], np.float64), b_old - delta, rtol=0, atol=2e-6)
    assert q.layers[0].bias is None or np.array_equal(q.layers[0].bias[...], model.layers[0].bias[...])

    def mean_error(m):
        return np.mean([np.asarray(apply(m, b) - apply(model, b), np.float64) for b in batches], axis=(0, 1))

    before, after = mean_error(q), mean_error(corrected)
    np.testing.assert_allclose(before, delta, rtol=0, atol=2e-5)
    assert np.abs(after).max() < 1e-5 < 1e-3 * np.abs(before).max()


def _conv_mean_errors(qmodel, float_model, batches):
    """Per conv: mean over the calibration inputs (N, H, W) of q_conv(x) - conv(x), x from float_model."""
    errors = []
    for i in range(2):
        d = []
        for x in batches:
            h = x if i == 0 else jax.nn.relu(apply(float_model.layers[0], x))
            d.append(
                np.asarray(apply(qmodel.layers[2 * i], h) - apply(float_model.layers[2 * i], h), np.float64)
            )
        errors.append(np.mean(np.concatenate(d), axis=(0, 1, 2)))
    return errors


def test_bias_correction_of_convs_with_quantized_activations_zeroes_the_mean_error(rng):
    model = nnx.Sequential(
        nnx.Conv(3, 6, (3, 3), rngs=nnx.Rngs(2)),
        jax.nn.relu,
        nnx.Conv(6, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(3)),
    )
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W3, activations=A8)])
    batches = _batches(rng, (4, 7, 7, 3), n=2)
    corrected = bias_correction(q, model, batches)
    for before, after in zip(
        _conv_mean_errors(q, model, batches), _conv_mean_errors(corrected, model, batches), strict=True
    ):
        assert np.abs(before).max() > 0.02
        assert np.abs(after).max() < 1e-5 < 1e-3 * np.abs(before).max()


def test_bias_correction_from_quantized_inputs_corrects_layers_in_order(rng):
    model = nnx.Sequential(
        nnx.Linear(16, 16, rngs=nnx.Rngs(4)), jax.nn.relu, nnx.Linear(16, 8, rngs=nnx.Rngs(5))
    )
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W3)])
    batches = _batches(rng, (32, 16))
    by_float = bias_correction(q, model, batches)
    by_quant = bias_correction(q, model, batches, inputs="quantized")
    # The first layer reads the model input in both modes.
    np.testing.assert_allclose(by_quant.layers[0].bias[...], by_float.layers[0].bias[...], rtol=0, atol=1e-6)

    def second_layer_error(corrected):
        """Mean error of the second layer on its input in the corrected quantized model."""
        d = []
        for x in batches:
            h = jax.nn.relu(apply(corrected.layers[0], x))
            d.append(np.asarray(apply(corrected.layers[2], h) - apply(model.layers[2], h), np.float64))
        return np.mean(np.concatenate(d), axis=0)

    assert np.abs(second_layer_error(by_quant)).max() < 1e-5
    assert np.abs(second_layer_error(by_float)).max() > 1e-3  # the float-input correction aims elsewhere


def test_bias_correction_without_creating_biases_leaves_those_layers(rng):
    model = nnx.Sequential(nnx.Linear(16, 8, use_bias=False, rngs=nnx.Rngs(1)))
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W3)])
    corrected = bias_correction(q, model, _batches(rng, (8, 16), n=1), create_bias=False)
    assert corrected.layers[0].bias is None and not corrected.layers[0].use_bias


def test_bias_correction_errors(rng):
    model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
    q = qjax.nn.quantize_model(model, [Rule(path=".*", weights=W3, activations=A8)])
    batches = _batches(rng, (8, 16), n=1)
    with pytest.raises(ValueError, match=r"inputs='both' is not one of 'float', 'quantized'"):
        bias_correction(q, model, batches, inputs="both")
    with pytest.raises(ValueError, match=r"got no batches"):
        bias_correction(q, model, iter([]))
    with pytest.raises(ValueError, match=r"qmodel has no quantized layers"):
        bias_correction(model, model, batches)
    qjax.nn.set_mode(q, "calibrate")
    with pytest.raises(ValueError, match=r"layer 'layers/0' is in mode 'calibrate'"):
        bias_correction(q, model, batches)
