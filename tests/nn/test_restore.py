"""A served model saved with orbax restores in a fresh process without calibration data:
:func:`qjax.nn.abstract_converted` builds the target, static activation scales included."""

import subprocess
import sys

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import qjax
from qjax.nn import Rule

RULES = [
    Rule(
        path="conv",
        weights={"dtype": "int8", "granularity": "per_channel", "axis": -1},
        activations={"dtype": "int8"},
        activation_scale="static",
        observer="histogram",
    ),
    Rule(
        path="head",
        weights={"dtype": "int4", "granularity": "per_channel", "axis": -1},
        activations={"dtype": "uint8", "symmetric": False},
        activation_estimator="lsq_plus",
    ),
]


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = self.drop(nnx.relu(self.bn(self.conv(x))))
        return self.head(x.reshape(x.shape[0], -1))


def inputs():
    return jax.random.normal(jax.random.key(7), (4, 8, 8, 1))


def restore(directory: str):
    """The served model restored from ``directory`` into the abstract converted model."""
    abstract = qjax.nn.abstract_converted(lambda: CNN(nnx.Rngs(0)), RULES)
    graphdef, target = nnx.split(abstract)
    restored = ocp.StandardCheckpointer().restore(directory, nnx.to_pure_dict(target))
    nnx.replace_by_pure_dict(target, restored)
    return nnx.merge(graphdef, target)


def test_abstract_converted_has_the_served_structure_without_compute():
    abstract = qjax.nn.abstract_converted(CNN(nnx.Rngs(0)), RULES)
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert isinstance(abstract.conv.kernel[...], qjax.QArray)
    static = abstract.conv.conv_general_dilated.static.get_value()
    assert static[0].shape == ()  # the per-tensor static scale, with its place in the state
    assert abstract.conv.conv_general_dilated.stats is None  # calibration statistics are not served


def test_served_model_restores_in_a_fresh_process(tmp_path):
    model = CNN(nnx.Rngs(0))
    model.eval()
    qmodel = qjax.nn.quantize_model(model, RULES)
    x = inputs()
    qjax.nn.calibrate(qmodel, [x, 2 * x])
    served = qjax.nn.convert(qmodel)
    expected = np.asarray(served(x))
    directory = tmp_path / "served"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory, nnx.to_pure_dict(nnx.state(served)))
    out = tmp_path / "out.npy"
    result = subprocess.run(
        [sys.executable, __file__, str(directory), str(out)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(out), expected)


def test_restore_into_a_calibration_free_model_fails_clearly():
    """The trap this replaces: converting an uncalibrated static model names the fix."""
    qmodel = qjax.nn.quantize_model(CNN(nnx.Rngs(0)), RULES)
    with pytest.raises(ValueError, match="no calibration"):
        qjax.nn.convert(qmodel)


if __name__ == "__main__":  # the fresh process: restore, run, save the output
    served = restore(sys.argv[1])
    served.eval()
    np.save(sys.argv[2], np.asarray(served(inputs()), np.float32))
    assert jnp.isfinite(served(inputs())).all()
