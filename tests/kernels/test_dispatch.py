"""Serving through the Pallas kernels (interpret mode on CPU) against the XLA path and fake quant.

A model converted by PTQ is run layer by layer (each layer on the input the fake-quant model feeds
it, see ``test_nn_serve``) with ``Rule.kernels`` = ``pallas``, ``reference`` and ``xla``; all three
must agree with the simulated (``qat``) forward within float rounding, and :func:`kernel_plan`
must pick the kernel the layer's formats call for.
"""

import itertools
import subprocess
import sys
import textwrap

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec
from qjax.nn import Rule
from tests import ROOT
from tests.nn.serving import (
    A8_TENSOR,
    A8_TOKEN,
    AU8_ASYM,
    FP8_CH,
    FP8_TENSOR,
    FP8_TOKEN,
    INT8_CH,
    MLP,
    each_layer,
    layer_inputs,
    shifted,
)

INT4_G32 = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=32)
INT4_G32_ASYM = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=32, symmetric=False)
INT4_G32_FULL = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=32, narrow_range=False)
UINT4_G64_ASYM = QuantSpec(dtype="uint4", granularity="per_group", axis=0, group_size=64, symmetric=False)
INT4_CH = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
WIDTHS = (128, 192, 128, 64, 40)  # N = 192, 128, 64, 40: some padded to the 128-wide blocks


def _served(rules, rng, batches=2, widths=WIDTHS):
    model = qjax.nn.quantize_model(MLP(nnx.Rngs(0), widths=widths), rules)
    if any(r.activation_scale == "static" and r.activations is not None for r in rules):
        qjax.nn.calibrate(model, [shifted(rng, 8, widths[0]) for _ in range(batches)])
    return model, qjax.nn.convert(model)


def _check_paths(rules, rng, kernel, m=8, widths=WIDTHS):
    qat, served = _served(rules, rng, widths=widths)
    x = shifted(rng, m, widths[0])
    xs = layer_inputs(qat, x)
    reference = [np.asarray(y, np.float64) for y in each_layer(qat, xs)]
    for _, _, op in qjax.nn.quantized_ops(served):
        w = op_weight(served, op)
        dn = (((1,), (0,)), ((), ()))
        lhs = jnp.zeros((m, w.shape[0]), jnp.float32)
        if op.rule.activations is not None:
            lhs = qjax.quantize(lhs, op.rule.activations, qparams=op.input_qparams())
        plan = qjax.kernels.kernel_plan(lhs, w, dn)
        assert (plan.kernel if plan else None) == kernel, op.path
    for path in ("pallas", "reference", "xla"):
        qjax.nn.set_kernels(served, path)
        ys = each_layer(served, xs)
        for i, (y, ref) in enumerate(zip(ys, reference, strict=True)):
            err = float(np.max(np.abs(np.asarray(y, np.float64) - ref)))
            assert err <= 2e-5 * np.max(np.abs(ref)), (path, i, err)


def op_weight(model, op):
    for _, layer, o in qjax.nn.quantized_ops(model):
        if o is op:
            return layer.kernel[...]
    raise AssertionError(op.path)


def _rules(weights, acts):
    return [
        Rule(path=f"layers/{i}", weights=weights, activations=a, activation_scale=scale)
        for i, (a, scale) in enumerate(acts)
    ]


INT8_ACTS = [(A8_TOKEN, "dynamic"), (A8_TENSOR, "dynamic"), (A8_TENSOR, "static"), (AU8_ASYM, "static")]
FP8_ACTS = [(FP8_TOKEN, "dynamic"), (FP8_TENSOR, "dynamic"), (FP8_TENSOR, "static"), (FP8_TOKEN, "dynamic")]
NO_ACTS = [(None, "dynamic")] * 4


@pytest.mark.parametrize("m", [1, 8])
def test_w8a8_through_the_kernel(rng, m):
    _check_paths(_rules(INT8_CH, INT8_ACTS), rng, "w8a8", m=m)


def test_fp8_through_the_kernel(rng):
    _check_paths(_rules(FP8_CH, FP8_ACTS), rng, "fp8")


@pytest.mark.parametrize(
    "weights",
    [INT4_G32, INT4_G32_ASYM, UINT4_G64_ASYM, INT4_CH, INT4_G32_FULL],
    ids=["g32", "g32-asym", "u4-g64", "channel", "g32-full_range"],
)
def test_w4a16_through_the_kernel(rng, weights):
    # per channel: one group of K; only K = 128 (layers 0 and 2) is a multiple of 128
    rules = _rules(weights, NO_ACTS)
    if weights is INT4_CH:
        rules = [Rule(path="layers/(0|2)", weights=weights)]
        _check_paths(rules, rng, "w4a16")
        return
    _check_paths(rules, rng, "w4a16")


@pytest.mark.parametrize("m", [1, 8])
def test_block_scaled_fp8_through_the_kernel(rng, m):
    weights = QuantSpec(dtype="float8_e4m3fn", granularity="per_block", block_shape=(128, 128))
    acts = QuantSpec(dtype="float8_e4m3fn", granularity="per_group", axis=-1, group_size=128)
    rules = [Rule(path=".*", weights=weights, activations=acts)]
    _check_paths(rules, rng, "fp8_block", m=m, widths=(128, 256, 128))


def test_uncovered_contractions_run_on_xla(rng):
    w4a8 = _rules(QuantSpec(dtype="int4", granularity="per_channel", axis=-1), INT8_ACTS)
    _check_paths(w4a8, rng, None)


def test_kernel_paths_are_validated():
    with pytest.raises(
        ValueError,
        match=r"kernels='triton' must be one of \['auto', 'pallas', 'xla', 'reference', 'mosaic_gpu'\]",
    ):
        Rule(path=".*", weights=INT8_CH, kernels="triton")
    model = qjax.nn.quantize_model(MLP(nnx.Rngs(0)), [Rule(path=".*", weights=INT8_CH)])
    with pytest.raises(ValueError, match=r"kernels='gpu' is not one of"):
        qjax.nn.set_kernels(model, "gpu")
    assert qjax.kernels.resolved_kernel_path("auto") == "xla"  # this machine is a CPU


@pytest.mark.parametrize(
    ("rules", "custom_call"),
    [
        (_rules(INT8_CH, INT8_ACTS), "mosaic_gpu"),
        (_rules(FP8_CH, FP8_ACTS), "mosaic_gpu"),
        (_rules(INT4_G32, NO_ACTS), "triton"),  # W4A16 has no Mosaic GPU body: Triton
    ],
    ids=["w8a8", "fp8", "w4a16"],
)
def test_mosaic_gpu_path_lowers_a_served_model_for_cuda(rng, rules, custom_call, lowered):
    _, served = _served(rules, rng)
    qjax.nn.set_kernels(served, "mosaic_gpu")
    graph, state = nnx.split(served)

    def forward(state, x):
        return nnx.merge(graph, state)(x)

    x = jax.ShapeDtypeStruct((256, WIDTHS[0]), jnp.float32)
    text = lowered(jax.jit(forward), state, x, platform="cuda")
    assert custom_call in text


def test_prepared_w4a16_weights_are_packed_once(rng, monkeypatch):
    """``prepare_kernels`` stores each W4A16 layer's packed weight; the served forward then packs
    nothing and gives the same outputs, bit for bit, on every path."""
    rules = _rules(INT4_G32_ASYM, NO_ACTS)
    qat, served = _served(rules, rng)
    x = shifted(rng, 8, WIDTHS[0])
    xs = layer_inputs(qat, x)
    before = {}
    for path in ("pallas", "reference", "xla"):
        qjax.nn.set_kernels(served, path)
        before[path] = [np.asarray(y) for y in each_layer(served, xs)]
    prepared = qjax.nn.prepare_kernels(served)
    assert prepared == [f"layers/{i}" for i in range(4)]
    rows = {r["path"]: r for r in qjax.nn.summary(served)}
    k, n_pad = WIDTHS[0], 256  # layer 0: K = 128 in groups of 32 (zero points too), N = 192 padded
    assert rows["layers/0"]["kernel_layout_bytes"] == k // 2 * n_pad + 2 * (k // 32) * n_pad * 4

    def no_packing(*args, **kwargs):
        raise AssertionError("a prepared layer packed its weight in the call")

    monkeypatch.setattr(qjax.kernels.dispatch, "pack_w4", no_packing)
    for path in ("pallas", "reference", "xla"):
        qjax.nn.set_kernels(served, path)
        for y, y0 in zip(each_layer(served, xs), before[path], strict=True):
            np.testing.assert_array_equal(np.asarray(y), y0)
    graph, state = nnx.split(served)  # the prepared weights are state: jit and split/merge carry them
    qjax.nn.set_kernels(served, "pallas")
    y = jax.jit(lambda s, v: nnx.merge(graph, s)(v))(state, x)
    assert y.shape == (8, WIDTHS[-1])


def test_prepare_kernels_refusals_and_uncovered_layers(rng):
    qat, served = _served(_rules(INT8_CH, INT8_ACTS), rng)
    with pytest.raises(ValueError, match=r"layer 'layers/0' is in mode 'qat': .*qjax.nn.convert"):
        qjax.nn.prepare_kernels(qat)
    assert qjax.nn.prepare_kernels(served) == []  # W8A8 layers: no W4A16 layout to prepare
    _, w4 = _served(_rules(INT4_G32, NO_ACTS), rng)
    qjax.nn.prepare_kernels(w4)
    ops = [op for _, _, op in qjax.nn.quantized_ops(w4)]
    ops[0].prepared, ops[1].prepared = ops[1].prepared, ops[0].prepared  # another layer's weight
    qjax.nn.set_kernels(w4, "pallas")
    with pytest.raises(ValueError, match=r"W4A16 weight is 192 x 128 but the layer's weight is 128 x 192"):
        w4(shifted(rng, 8, WIDTHS[0]))


@pytest.mark.parametrize(
    ("weights", "acts", "kernel"),
    [(INT8_CH, INT8_ACTS, "w8a8_matmul"), (FP8_CH, FP8_ACTS, "fp8_matmul")],
    ids=["w8a8", "fp8"],
)
def test_prepared_nk_weights_feed_the_kernels_transposed(rng, monkeypatch, weights, acts, kernel):
    """``prepare_kernels(w8_layout="nk")``: every 8-bit layer holds an (N, K) copy, the experimental
    ``*_nk`` kernels read it, and the outputs stay those of the (K, N) weights (W8A8: bit for bit,
    its int32 sums are exact; FP8: within float32 summation order)."""
    from qjax.kernels.experimental import nk_layout

    _, served = _served(_rules(weights, acts), rng)
    x = shifted(rng, 8, WIDTHS[0])
    xs = layer_inputs(served, x)
    qjax.nn.set_kernels(served, "pallas")
    before = [np.asarray(y, np.float64) for y in each_layer(served, xs)]
    assert qjax.nn.prepare_kernels(served) == []  # "kn": 8-bit weights are read as stored
    assert qjax.nn.prepare_kernels(served, w8_layout="nk") == [f"layers/{i}" for i in range(4)]
    layouts = []
    real = getattr(nk_layout, f"{kernel}_nk")

    def spy(*args, **kwargs):
        layouts.append(("nk", tuple(args[2].shape)))
        return real(*args, **kwargs)

    monkeypatch.setattr(nk_layout, f"{kernel}_nk", spy)
    after = [np.asarray(y, np.float64) for y in each_layer(served, xs)]
    assert layouts == [("nk", (n, k)) for k, n in itertools.pairwise(WIDTHS)]
    for y, y0 in zip(after, before, strict=True):
        if kernel == "w8a8_matmul":
            np.testing.assert_array_equal(y, y0)
        else:
            assert np.max(np.abs(y - y0)) <= 1e-5 * np.max(np.abs(y0))
    for path in ("reference", "xla"):  # the reference reads the (N, K) copy too; XLA the QArray
        qjax.nn.set_kernels(served, path)
        for y, y0 in zip(each_layer(served, xs), before, strict=True):
            assert np.max(np.abs(np.asarray(y, np.float64) - y0)) <= 2e-5 * np.max(np.abs(y0))
    with pytest.raises(ValueError, match="w8_layout='kk': expected 'kn'"):
        qjax.nn.prepare_kernels(served, w8_layout="kk")


_SERVE_EVERY_DEFAULT_PATH = """
import sys
import flax.nnx as nnx
import jax.numpy as jnp
import qjax
from qjax import QuantSpec
from qjax.nn import Rule
from tests.nn.serving import A8_TOKEN, FP8_CH, FP8_TOKEN, INT8_CH, MLP

w4 = QuantSpec(dtype="int4", granularity="per_group", axis=0, group_size=32)
models = {
    "w8a8": [Rule(path=".*", weights=INT8_CH, activations=A8_TOKEN)],
    "fp8": [Rule(path=".*", weights=FP8_CH, activations=FP8_TOKEN)],
    "w4a16": [Rule(path=".*", weights=w4)],
}
x = jnp.ones((3, 64), jnp.float32)
served = {}
for name, rules in models.items():
    served[name] = qjax.nn.convert(qjax.nn.quantize_model(MLP(nnx.Rngs(0), widths=(64, 32)), rules))
    if name == "w4a16":
        qjax.nn.prepare_kernels(served[name])
    for path in ("auto", "pallas", "xla", "reference"):
        qjax.nn.set_kernels(served[name], path)
        served[name](x).block_until_ready()
print(sorted(m for m in sys.modules if m.startswith("qjax.kernels.experimental")))
qjax.nn.prepare_kernels(served["w8a8"], w8_layout="nk")
print(sorted(m for m in sys.modules if m.startswith("qjax.kernels.experimental")))
"""


def test_default_paths_do_not_import_the_experimental_kernels():
    """In a fresh process: ``import qjax`` and serving W8A8, FP8 and W4A16 models (the W4A16 layout
    prepared) on ``auto``, ``pallas``, ``xla`` and ``reference`` import no module of
    ``qjax.kernels.experimental``; ``prepare_kernels(w8_layout="nk")``, which names it, does."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SERVE_EVERY_DEFAULT_PATH)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = run.stdout.strip().splitlines()[-2:]
    assert before == "[]"
    assert "'qjax.kernels.experimental.nk_layout'" in after
