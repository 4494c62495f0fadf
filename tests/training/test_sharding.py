"""Sharding (qjax.training.sharding): FSDP specs for kernels, quantizer scales and QArrays; a sharded
QAT step equal to the single-device one; checkpoints moving between meshes.

The tests named ``test_multidevice_*`` need 8 devices. On CPU that takes
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax starts, so
``test_eight_device_tests_in_subprocess`` runs them in a separate pytest process; the rest of the
suite keeps its one device.
"""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import qjax
from qjax import training
from qjax.nn import Rule
from tests import ROOT
from tests.processes import run_multidevice_tests


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)  # largest axis: output -> per-channel scale follows
        self.l2 = nnx.Linear(128, 10, rngs=rngs)  # largest axis: input -> per-channel scale replicated

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


W4 = qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
QAT_RULES = [
    Rule(
        path=".*",
        weights=W4,
        activations=qjax.QuantSpec(dtype="int8"),
        weight_estimator="lsq",
        activation_estimator="pact",
    )
]


def qat_model(seed=0):
    return qjax.nn.quantize_model(MLP(nnx.Rngs(seed)), QAT_RULES, mode="qat")


def served(seed=0, spec=W4):
    return qjax.nn.quantize_model(MLP(nnx.Rngs(seed)), [Rule(path=".*", weights=spec)], mode="convert")


def specs_of(model, size):
    return nnx.to_pure_dict(training.partition_specs(model, fsdp_size=size))


# -- specs (no devices needed) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "size", "want"),
    [
        ([(64, 128)], 2, 1),
        ([(128, 10)], 2, 0),
        ([(64, 64)], 2, 1),  # tie: the later axis
        ([(3, 3, 16, 32)], 8, 3),
        ([(10, 7)], 4, None),
        ([(64, 128)], 1, None),
        ([(12, 20), (12, 10)], 4, 0),  # 20 divides but its packed 10 does not
    ],
)
def test_largest_divisible_axis(shapes, size, want):
    assert training.largest_divisible_axis(shapes, size) == want


def test_follow_spec_splits_a_scale_where_whole_blocks_fit():
    kernel = P(None, "fsdp")
    assert training.follow_spec(kernel, (1, 128), 2) == P(None, "fsdp")  # per-channel on outputs
    assert training.follow_spec(kernel, (1, 1), 2) == P()  # per-tensor
    assert training.follow_spec(P("fsdp", None), (1, 10), 2) == P()  # kernel split on inputs
    assert training.follow_spec(kernel, (4, 3), 2) == P()  # 3 groups cannot split in 2
    assert training.follow_spec(kernel, (), 2) == P()


def test_qat_model_specs_shard_kernels_and_their_scales():
    s = specs_of(qat_model(), 2)
    assert s["l1"]["kernel"] == P(None, "fsdp")
    assert s["l1"]["dot_general"]["weight_scale"] == P(None, "fsdp")
    assert s["l2"]["kernel"] == P("fsdp", None)
    assert s["l2"]["dot_general"]["weight_scale"] == P()
    for layer in ("l1", "l2"):
        assert s[layer]["bias"] == P()
        assert s[layer]["dot_general"]["act_clip"] == P()
        assert set(s[layer]["dot_general"]["stats"].values()) == {P()}


def test_converted_specs_follow_the_packed_data():
    model = served()
    s = specs_of(model, 2)
    k1, k2 = s["l1"]["kernel"], s["l2"]["kernel"]
    assert isinstance(k1, qjax.QArray)
    assert (k1.data, k1.scale, k1.zero_point) == (P(None, "fsdp"), P(None, "fsdp"), None)
    assert (k2.data, k2.scale) == (P("fsdp", None), P())
    # int4 (128, 10) over 4: axis 1 (10) does not divide, axis 0 does
    assert specs_of(model, 4)["l2"]["kernel"].data == P("fsdp", None)
    layer = nnx.Linear(12, 20, rngs=nnx.Rngs(0))  # packed (12, 10): 20 divides by 4, 10 does not
    k = specs_of(qjax.nn.quantize_model(layer, [Rule(path=".*", weights=W4)], mode="convert"), 4)["kernel"]
    assert (k.data, k.scale) == (P("fsdp", None), P())


def test_user_annotations_are_kept():
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "data"))
    with nnx.use_eager_sharding(False):  # annotate only; no mesh to place it on here
        layer = nnx.Linear(64, 128, kernel_init=init, rngs=nnx.Rngs(0))
    assert specs_of(layer, 2)["kernel"] == P(None, "data")


def test_mesh_needs_enough_devices():
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"data={n} x fsdp=2 needs {2 * n} devices; {n} available"):
        training.make_mesh(n, 2)


class RowsOf:
    """A sharding stand-in whose devices hold the given row slices of a batch."""

    def __init__(self, *slices):
        self.slices = slices

    def addressable_devices_indices_map(self, shape):
        return {i: (s,) for i, s in enumerate(self.slices)}


def test_process_rows_is_one_block_or_an_error():
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert training.process_rows(one, 7) == slice(0, 7)
    assert training.process_rows(RowsOf(slice(4, 6), slice(2, 4)), 8) == slice(2, 6)
    assert training.process_rows(RowsOf(slice(None), slice(0, 3)), 8) == slice(0, 8)
    with pytest.raises(ValueError, match=r"holds rows \[\(0, 2\), \(4, 6\)\] of the batch, not one block"):
        training.process_rows(RowsOf(slice(0, 2), slice(4, 6)), 8)


def test_global_batch_of_one_process_loads_the_whole_batch():
    loaded = []

    def load(idx):
        loaded.append(idx)
        return np.stack([idx, 2 * idx], axis=1).astype(np.float32)

    idx = np.array([5, 1, 3])
    x = training.make_global_batch(load, idx, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    np.testing.assert_array_equal(loaded[0], idx)
    np.testing.assert_array_equal(x, [[5, 10], [1, 2], [3, 6]])


def test_abstract_targets_restore_onto_device_zero_with_one_process():
    assert training.default_sharding() == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_eight_device_tests_in_subprocess():
    """The 8-device tests of the library and of the runner's mesh, in one process."""
    placement_tests = ROOT / "tests" / "experiments" / "sweep" / "test_placement.py"
    run_multidevice_tests([__file__, str(placement_tests)], passed=5)


# -- 8 devices --------------------------------------------------------------------------------------


def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def digits_batches(n):
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    return [(jnp.asarray(x[i * 64 : (i + 1) * 64]), jnp.asarray(y[i * 64 : (i + 1) * 64])) for i in range(n)]


SINGLE_DEVICE_STEP = training.make_train_step(loss_fn)


def placed(model, mesh):
    """Model and Adam optimizer on ``mesh`` (``None``: one device), and their train step."""
    optimizer = training.make_optimizer(model, optax.adam(1e-2))
    if mesh is None:
        return model, optimizer, SINGLE_DEVICE_STEP
    training.shard_model(model, mesh)
    training.shard_optimizer(optimizer, model, mesh)
    step = training.make_train_step(loss_fn, shardings=training.state_shardings(model, optimizer))
    return model, optimizer, step


def train(setup, batches, mesh):
    model, optimizer, step = setup
    return [
        float(step(model, optimizer, b if mesh is None else training.shard_batch(b, mesh))) for b in batches
    ]


def spec_of(x):
    """The array's PartitionSpec padded to its rank (``None`` on a single device)."""
    if not isinstance(x.sharding, NamedSharding):
        return None
    spec = tuple(x.sharding.spec)
    return P(*spec, *([None] * (x.ndim - len(spec))))


def assert_close(a, b, **tol):
    for u, v in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


def test_multidevice_sharded_qat_step_matches_single_device():
    batches = digits_batches(4)
    base = qjax.nn.calibrate(qat_model(), [batches[0][0]])
    mesh = training.make_mesh(4, 2)
    single, sharded = placed(nnx.clone(base), None), placed(nnx.clone(base), mesh)
    x = training.shard_batch(batches[0], mesh)[0]
    assert spec_of(x) == P("data", None) and x.addressable_shards[0].data.shape == (16, 64)
    losses_1, losses_8 = train(single, batches, None), train(sharded, batches, mesh)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    assert losses_1[-1] < losses_1[0]
    assert_close(sharded[0], single[0], rtol=1e-4, atol=1e-5)
    assert_close(sharded[1], single[1], rtol=1e-4, atol=1e-6)
    # The layout survives the steps: kernels and the scale that follows one stay split on fsdp.
    model, optimizer = sharded[0], sharded[1]
    assert spec_of(model.l1.kernel[...]) == P(None, "fsdp")
    assert spec_of(model.l1.dot_general.weight_scale[...]) == P(None, "fsdp")
    assert spec_of(model.l2.kernel[...]) == P("fsdp", None)
    assert spec_of(optimizer.opt_state[0].mu["l1"]["kernel"][...]) == P(None, "fsdp")
    assert model.l1.kernel[...].addressable_shards[0].data.shape == (64, 64)


def test_multidevice_global_batch_and_replicate():
    mesh = training.make_mesh(4, 2)
    data = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    idx = np.array([3, 15, 0, 7, 9, 2, 11, 4])
    x = training.make_global_batch(lambda i: data[i], idx, NamedSharding(mesh, P("data")))
    assert x.sharding.spec == P("data") and x.addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(x, data[idx])
    model = placed(qat_model(), mesh)[0]
    before = jax.tree.map(np.asarray, nnx.state(model))
    training.replicate(model, mesh)
    kernel = model.l1.kernel[...]
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)


def test_multidevice_checkpoint_moves_between_meshes(tmp_path):
    batches = digits_batches(3)
    mesh_a, mesh_b = training.make_mesh(4, 2), training.make_mesh(2, 4)
    src = placed(qat_model(), mesh_a)
    train(src, batches[:2], mesh_a)
    serve_src = training.shard_model(served(), mesh_a)
    x = batches[2][0]
    serve_out = np.asarray(nnx.jit(lambda m, x: m(x))(serve_src, x))
    with training.TrainingCheckpointer(tmp_path / "qat") as ckpt:
        ckpt.save(2, src[0], src[1])
        targets = {"2x4": placed(qat_model(seed=1), mesh_b), "one device": placed(qat_model(seed=1), None)}
        for name, target in targets.items():
            ckpt.restore(target[0], target[1])
            assert_close(target[0], src[0], rtol=0, atol=0)
            assert_close(target[1], src[1], rtol=0, atol=0)
            kernel = target[0].l1.kernel[...]
            want_spec = P(None, "fsdp") if name == "2x4" else None
            assert spec_of(kernel) == want_spec, name
            assert kernel.addressable_shards[0].data.shape == ((64, 32) if name == "2x4" else (64, 128))
    # the restored runs continue as the source does
    next_loss = train(src, batches[2:], mesh_a)
    np.testing.assert_allclose(train(targets["2x4"], batches[2:], mesh_b), next_loss, rtol=1e-5)
    np.testing.assert_allclose(train(targets["one device"], batches[2:], None), next_loss, rtol=1e-5)
    # a converted model: packed int4 data and scales move from 4x2 to 2x4
    with training.TrainingCheckpointer(tmp_path / "serve") as ckpt:
        ckpt.save(0, serve_src)
        serve_dst = training.shard_model(served(seed=1), mesh_b)
        ckpt.restore(serve_dst)
    q = serve_dst.l1.kernel.get_value()
    assert spec_of(q.data) == P(None, "fsdp") and q.data.addressable_shards[0].data.shape == (64, 16)
    assert spec_of(q.scale) == P(None, "fsdp")
    np.testing.assert_array_equal(q.data, serve_src.l1.kernel.get_value().data)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(serve_dst, x), serve_out, rtol=1e-5, atol=1e-5)
