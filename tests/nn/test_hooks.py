"""qjax.nn.hooks: which layers are quantizable, through which hook, and temporary hook wrappers."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.nn import LayerHook, Mode, OpKind, join_path, layer_hook, quantizable_layers, wrapped_contractions


class Mixed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs), nnx.Einsum("btd,df->btf", (8, 4), rngs=rngs)])
        self.conv = nnx.Conv(4, 4, (1,), rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, ids):
        h = self.blocks[1](self.blocks[0](self.embed(ids)))
        return self.norm(self.conv(h))


def test_layer_hook_of_each_layer_type():
    m = Mixed(nnx.Rngs(0))
    assert layer_hook(m.blocks[0]) == LayerHook("dot_general", "kernel", OpKind.DOT_GENERAL)
    assert layer_hook(m.conv) == LayerHook("conv_general_dilated", "kernel", OpKind.CONV)
    assert layer_hook(m.blocks[1]) == LayerHook("einsum_op", "kernel", OpKind.EINSUM)
    assert layer_hook(m.embed) == LayerHook("promote_dtype", "embedding", OpKind.EMBED)
    assert [layer_hook(x).operand for x in (m.blocks[0], m.conv, m.blocks[1])] == [0, 0, 1]
    with pytest.raises(TypeError, match="LayerNorm is not a quantizable layer"):
        layer_hook(m.norm)


def test_quantizable_layers_with_joined_paths():
    m = Mixed(nnx.Rngs(0))
    assert [p for p, _ in quantizable_layers(m)] == ["blocks/0", "blocks/1", "conv", "embed"]  # sorted names
    assert join_path(("blocks", 0, "attn")) == "blocks/0/attn"
    assert join_path(()) == ""


def test_wrapped_contractions_wraps_and_restores():
    m = Mixed(nnx.Rngs(0))
    ids = jnp.arange(6).reshape(2, 3)
    expected = m(ids)
    seen = []

    def wrap(path, inner, operand):
        def hook(*args, **kwargs):
            seen.append((path, args[operand].shape))
            return inner(*args, **kwargs)

        return hook

    originals = {p: getattr(layer, layer_hook(layer).hook) for p, layer in quantizable_layers(m)}
    with wrapped_contractions(m, wrap):
        np.testing.assert_array_equal(m(ids), expected)
    assert seen == [("blocks/0", (2, 3, 8)), ("blocks/1", (2, 3, 8)), ("conv", (2, 3, 4))]
    for p, layer in quantizable_layers(m):
        assert getattr(layer, layer_hook(layer).hook) is originals[p]
    seen.clear()
    with wrapped_contractions(m, wrap, paths={"conv"}):
        m(ids)
    assert seen == [("conv", (2, 3, 4))]


def test_wrapped_contractions_restores_after_an_error():
    m = Mixed(nnx.Rngs(0))
    before = m.blocks[0].dot_general

    def failing(path, inner, operand):
        def hook(*args, **kwargs):
            raise RuntimeError(f"stop at {path}")

        return hook

    with pytest.raises(RuntimeError, match="stop at blocks/0"), wrapped_contractions(m, failing):
        m(jnp.zeros((1, 2), jnp.int32))
    assert m.blocks[0].dot_general is before


def test_ops_hold_their_kind_and_mode_as_enums():
    m = Mixed(nnx.Rngs(0))
    rules = [qjax.nn.Rule(path=".*", weights=qjax.QuantSpec(dtype="int8"))]
    q = qjax.nn.quantize_model(m, rules, mode=Mode.CALIBRATE)
    kinds = {
        p: op.kind for p, _, op in qjax.nn.quantized_ops(q) if isinstance(op, qjax.nn.QuantizedContraction)
    }
    assert kinds == {"blocks/0": OpKind.DOT_GENERAL, "blocks/1": OpKind.EINSUM, "conv": OpKind.CONV}
    assert {op.mode for _, _, op in qjax.nn.quantized_ops(q)} == {Mode.CALIBRATE}
    qjax.nn.set_mode(q, "qat")
    assert all(op.mode is Mode.QAT for _, _, op in qjax.nn.quantized_ops(q))
    served = qjax.nn.convert(q)
    assert all(op.mode is Mode.SERVE for _, _, op in qjax.nn.quantized_ops(served))
    assert {row["mode"] for row in qjax.nn.summary(served)} == {"serve"}
    assert all(type(row["mode"]) is str for row in qjax.nn.summary(served))  # plain values for reports
    jax.block_until_ready(served(jnp.arange(6).reshape(2, 3)))


def test_modes():
    assert qjax.nn.MODES == ("qat", "calibrate", "serve")
    assert Mode("convert") is Mode.CONVERT
    with pytest.raises(
        ValueError, match=r"mode='bogus' is not one of \['qat', 'calibrate', 'serve', 'convert'\]"
    ):
        qjax.nn.QuantizedOp("dot_general", "x", qjax.nn.Rule(path=".*"), jnp.zeros((2, 2)), "bogus")
    with pytest.raises(ValueError, match=r"kind='matmul' is not one of"):
        qjax.nn.QuantizedOp("matmul", "x", qjax.nn.Rule(path=".*"), jnp.zeros((2, 2)), "qat")
