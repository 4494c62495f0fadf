"""A cell on a ``data x fsdp`` mesh (``mesh:``; ``experiments.sweep.placement``): the mesh's sizes
and errors, validation before compute, and (on 8 simulated devices, in the subprocess that
``tests/training/test_sharding.py`` starts) a float and a QAT cell on a 2 x 2 mesh: parameters,
optimizer and quantizer state split as configured, the record naming the 4 devices that held them,
metrics equal to the one-device run's."""

import flax.nnx as nnx
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import placement, run
from experiments.tasks.base import Split
from tests import ROOT

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"


@pytest.mark.parametrize(
    ("data", "fsdp", "n", "expected"),
    [(1, 1, 1, (1, 1)), (-1, 1, 8, (8, 1)), (2, -1, 8, (2, 4)), (-1, 2, 8, (4, 2)), (2, 2, 8, (2, 2))],
)
def test_mesh_shape(data, fsdp, n, expected):
    assert placement.mesh_shape(data, fsdp, n) == expected


@pytest.mark.parametrize(
    ("data", "fsdp", "n", "match"),
    [
        (0, 1, 8, r"mesh.data=0: must be >= 1, or -1"),
        (1, -2, 8, r"mesh.fsdp=-2: must be >= 1, or -1"),
        (-1, -1, 8, r"both -1"),
        (-1, 3, 8, r"8 devices cannot be split evenly by 3"),
        (4, 4, 8, r"needs 16 devices; 8 available .*xla_force_host_platform_device_count"),
    ],
)
def test_mesh_shape_errors(data, fsdp, n, match):
    with pytest.raises(ValueError, match=match):
        placement.mesh_shape(data, fsdp, n)


def test_one_device_mesh_places_nothing():
    p = placement.Placement.of(1, 1)
    assert p.mesh is None and p.describe() is None
    split = Split(np.arange(6, dtype=np.float32).reshape(3, 2), np.arange(3))
    x, y = p.take(split, np.array([2, 0]))
    np.testing.assert_array_equal(x, [[4, 5], [0, 1]])
    np.testing.assert_array_equal(y, [2, 0])


def test_mesh_problems_are_named_before_compute():
    n = jax.device_count()
    with pytest.raises(config_lib.ConfigError, match=rf"mesh: .*needs {2 * n} devices; {n} available"):
        config_lib.load(SMOKE, [f"mesh.data={2 * n}"]).cells()


def test_mesh_is_not_part_of_the_config_hash():
    one = config_lib.load(SMOKE, []).cells()
    other = config_lib.load(SMOKE, ["mesh.data=-1"]).cells()
    assert [c.hash for c in one] == [c.hash for c in other]


# -- 8 devices --------------------------------------------------------------------------------------


def test_multidevice_batch_and_validation():
    p = placement.Placement.of(2, 2)
    split = Split(np.arange(10 * 3, dtype=np.float32).reshape(10, 3), np.arange(10))
    idx = np.array([9, 1, 4, 3, 0, 2, 8, 5])
    x, y = p.take(split, idx)
    assert x.sharding.spec == y.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(x, split.x[idx])
    np.testing.assert_array_equal(y, idx)
    odd, _ = p.take(split, idx[:5])  # the last evaluation batch: replicated over the mesh
    assert odd.sharding.is_fully_replicated and len(odd.sharding.device_set) == 4
    np.testing.assert_array_equal(odd, split.x[idx[:5]])
    with pytest.raises(config_lib.ConfigError, match=r"train.batch_size: 63 is not divisible by mesh.data=2"):
        config_lib.load(SMOKE, ["mesh.data=2", "train.batch_size=63"]).cells()
    with pytest.raises(config_lib.ConfigError, match=r"mesh: method.gptq: one device only"):
        config_lib.load(SMOKE, ["mesh.data=2", "method.gptq=true"]).cells()


def test_multidevice_cells_on_a_2x2_mesh_match_one_device(tmp_path, monkeypatch):
    models, optimizers = [], []
    model_of, optimizer_of = placement.Placement.model, placement.Placement.optimizer

    def spy_model(self, model):
        models.append((self.mesh is not None, model_of(self, model)))
        return models[-1][1]

    def spy_optimizer(self, optimizer, model):
        optimizers.append((self.mesh is not None, optimizer_of(self, optimizer, model)))
        return optimizers[-1][1]

    monkeypatch.setattr(placement.Placement, "model", spy_model)
    monkeypatch.setattr(placement.Placement, "optimizer", spy_optimizer)
    common = [
        "sweep.method.name=[float,qat]",
        "method.steps=10",
        "quant.weight_estimator=lsq",
        "eval.diagnostics=false",
    ]
    results = {}
    for name, extra in (("one", []), ("mesh", ["mesh.data=2", "mesh.fsdp=2"])):
        spec = config_lib.load(SMOKE, [f"output_dir={tmp_path / name}", *common, *extra])
        results[name] = {r["cell"]: r for r in records.read_results(run.run_sweep(spec))}

    for r in results["mesh"].values():
        assert r["status"] == "ok"
        assert r["protocol"]["device"] == "cpu: cpu x4"  # of the 8 the host has
        assert r["protocol"]["host_devices"] == "cpu: cpu x8"
        assert r["protocol"]["mesh"] == {
            "data": 2,
            "fsdp": 2,
            "devices": [f"cpu:{i}" for i in range(4)],
            "processes": 1,
        }
    for r in results["one"].values():
        assert r["protocol"]["device"] == "cpu: cpu x1" and r["protocol"]["mesh"] is None

    # the model and the optimizer of QAT: kernels, LSQ scales and Adam moments split over fsdp
    qat_model = [m for on_mesh, m in models if on_mesh][-1]
    qat_optimizer = [o for on_mesh, o in optimizers if on_mesh][-1]
    split = 0
    layers = (qat_model.fc1, qat_model.fc2, qat_model.head)
    for layer in layers:
        kernel = layer.kernel.get_value()
        assert isinstance(kernel.sharding, NamedSharding) and len(kernel.sharding.device_set) == 4
        spec = tuple(kernel.sharding.spec)
        if "fsdp" in spec:
            split += 1
            scale = layer.dot_general.weight_scale.get_value()
            axis = spec.index("fsdp")
            if scale.shape[axis] % 2 == 0:
                assert tuple(scale.sharding.spec)[axis] == "fsdp"
    assert split >= 2
    kernels = {
        layer.kernel.get_value().shape: tuple(layer.kernel.get_value().sharding.spec) for layer in layers
    }
    moments = [x for x in jax.tree.leaves(nnx.state(qat_optimizer)) if getattr(x, "shape", ()) in kernels]
    assert len(moments) >= 2 * len(kernels)  # Adam's mu and nu of every kernel, split like it
    for x in moments:
        assert tuple(x.sharding.spec) == kernels[x.shape], (x.shape, x.sharding)

    one, mesh = results["one"], results["mesh"]
    float_cell, qat_cell = "method.name=float", "method.name=qat"
    assert mesh[float_cell]["metrics"]["accuracy"] == one[float_cell]["metrics"]["accuracy"]
    assert mesh[float_cell]["metrics"]["loss"] == pytest.approx(one[float_cell]["metrics"]["loss"], abs=1e-5)
    # quantized training: rounding on a split sum can flip a quantization decision; measured equal
    assert mesh[qat_cell]["metrics"]["loss"] == pytest.approx(one[qat_cell]["metrics"]["loss"], abs=1e-3)
    assert abs(mesh[qat_cell]["metrics"]["accuracy"] - one[qat_cell]["metrics"]["accuracy"]) <= 0.01
