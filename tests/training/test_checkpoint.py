"""Orbax checkpoints (qjax.training.checkpoint): exact resume of a killed QAT run, keep-K / every-N,
converted models restored with their packed integer weights, and their size on disk."""

import os
import signal
import subprocess
import sys
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import qjax
from qjax import training
from qjax.nn import Rule

SEED = 0
BATCH = 64
N_EXAMPLES = 200  # 3 batches per epoch: runs cross epoch boundaries


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)  # RNG state inside the model
        self.l2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


RULES = [
    Rule(
        path=".*",
        weights=qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1),
        activations=qjax.QuantSpec(dtype="int8"),
        weight_estimator="lsq",
        activation_estimator="pact",
    )
]


def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


STEP = training.make_train_step(loss_fn)


def digits():
    x, y = load_digits(return_X_y=True)
    return (x[:N_EXAMPLES] / 16.0).astype(np.float32), y[:N_EXAMPLES].astype(np.int32)


def fresh(seed):
    """Model, optimizer and loop RNG; ``seed`` != SEED gives different values to prove restore."""
    model = qjax.nn.quantize_model(MLP(nnx.Rngs(seed)), RULES, mode="qat")
    return model, training.make_optimizer(model, optax.adam(1e-2)), nnx.Rngs(noise=seed + 100)


def run(state, data, *, start, until, ckpt=None, report=None):
    """Train from ``start`` up to step ``until``: input noise from the loop RNG, dropout from the
    model's, batches from the data position."""
    model, optimizer, rngs = state
    x, y = data
    for pos, idx in training.batch_indices(len(x), BATCH, seed=SEED, start=start):
        noisy = jnp.asarray(x[idx]) + 0.05 * jax.random.normal(rngs.noise(), (BATCH, 64))
        STEP(model, optimizer, (noisy, jnp.asarray(y[idx])))
        if ckpt is not None and ckpt.save(pos.step, model, optimizer, rngs=rngs, data=pos) and report:
            report(pos.step)
        if pos.step == until:
            return pos
    raise AssertionError("unreachable")


def assert_same_state(a, b):
    for node_a, node_b in zip(a, b, strict=True):
        leaves_a, leaves_b = jax.tree.leaves(nnx.state(node_a)), jax.tree.leaves(nnx.state(node_b))
        assert len(leaves_a) == len(leaves_b)
        for u, v in zip(leaves_a, leaves_b, strict=True):
            if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
                u, v = jax.random.key_data(u), jax.random.key_data(v)
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def resume(directory):
    state = fresh(seed=1)
    with training.TrainingCheckpointer(directory) as ckpt:
        restored = ckpt.restore(*state[:2], rngs=state[2])
    assert restored is not None
    return state, restored


def test_stopped_run_resumes_to_the_same_parameters(tmp_path):
    data = digits()
    reference = fresh(SEED)
    run(reference, data, start=training.DataPosition(), until=10)

    state = fresh(SEED)
    with training.TrainingCheckpointer(tmp_path, save_every=3, keep=2) as ckpt:
        assert ckpt.restore(*state[:2], rngs=state[2]) is None  # fresh start: nothing to restore
        run(state, data, start=training.DataPosition(), until=7, ckpt=ckpt)  # "killed" after step 7
        assert ckpt.all_steps() == [3, 6]
    del state
    resumed, restored = resume(tmp_path)
    assert restored.step == 6
    assert restored.data == {"step": 6, "epoch": 2, "index": 0}
    with pytest.raises(AssertionError):  # step 6 is not step 10: the comparison below can fail
        assert_same_state(resumed, reference)
    run(resumed, data, start=training.DataPosition.from_dict(restored.data), until=10)
    assert_same_state(resumed, reference)


def child_main(directory):
    """Run in a subprocess by the test below: train, saving every step, until killed."""
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    state = fresh(SEED)
    with training.TrainingCheckpointer(directory, save_every=1, keep=3) as ckpt:
        run(
            state,
            digits(),
            start=training.DataPosition(),
            until=10_000,
            ckpt=ckpt,
            report=lambda step: print(f"saved {step}", flush=True),
        )


def test_process_killed_mid_run_resumes_to_the_same_parameters(tmp_path):
    child = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while not line.startswith("saved 4") and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line and child.poll() is not None:
                pytest.fail(f"training subprocess exited early: {child.stderr.read()[-2000:]}")
        os.kill(child.pid, signal.SIGKILL)  # mid-run, possibly mid-save
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
    resumed, restored = resume(tmp_path)
    assert restored.step >= 4
    assert restored.data["step"] == restored.step
    target = restored.step + 3
    run(resumed, digits(), start=training.DataPosition.from_dict(restored.data), until=target)
    reference = fresh(SEED)
    run(reference, digits(), start=training.DataPosition(), until=target)
    assert_same_state(resumed, reference)


def test_every_n_keep_k_and_errors(tmp_path):
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    with training.TrainingCheckpointer(tmp_path, save_every=3, keep=2, async_save=True) as ckpt:
        saved = [s for s in range(1, 11) if ckpt.save(s, model, data={"step": s})]
        ckpt.wait_until_finished()
        assert saved == [3, 6, 9]
        assert ckpt.all_steps() == [6, 9]
        assert ckpt.save(10, model, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [9, 10]
        assert ckpt.latest_step() == 10
        restored = ckpt.restore(model, step=9)
        assert restored == training.RestoredCheckpoint(9, {"step": 9})
        assert ckpt.restore(model).data is None  # step 10 was saved without a data position
        with pytest.raises(ValueError, match=r"no checkpoint for step=3 .* have \[9, 10\]"):
            ckpt.restore(model, step=3)
        optimizer = training.make_optimizer(model, optax.sgd(0.1))
        with pytest.raises(ValueError, match=r"checkpoint step 10 .* has no 'optimizer' item"):
            ckpt.restore(model, optimizer)
    with pytest.raises(ValueError, match="save_every=0 must be >= 1"):
        training.TrainingCheckpointer(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep=0 must be >= 1"):
        training.TrainingCheckpointer(tmp_path, keep=0)


# -- converted (serve) models --------------------------------------------------------------------


class Wide(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 512, rngs=rngs)
        self.l2 = nnx.Linear(512, 512, rngs=rngs)
        self.l3 = nnx.Linear(512, 10, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def served(dtype, float_model):
    spec = qjax.QuantSpec(dtype=dtype, granularity="per_channel", axis=-1)
    return qjax.nn.quantize_model(float_model, [Rule(path=".*", weights=spec)], mode="convert")


FORWARD = nnx.jit(lambda model, x: model(x))


@pytest.mark.parametrize(("dtype", "bound"), [("int8", 0.32), ("int4", 0.18)])
def test_converted_model_restores_packed_and_is_smaller_on_disk(tmp_path, dtype, bound):
    float_model = Wide(nnx.Rngs(0))
    model = served(dtype, float_model)
    x = jnp.asarray(digits()[0][:32])
    want = np.asarray(FORWARD(model, x))
    with training.TrainingCheckpointer(tmp_path / "float") as ckpt:
        ckpt.save(0, float_model)
        float_bytes = ckpt.step_bytes(0)
    with training.TrainingCheckpointer(tmp_path / dtype) as ckpt:
        ckpt.save(0, model)
        quant_bytes = ckpt.step_bytes(0)
        # The structure (QuantSpec, logical length: static fields of QArray) comes from a fresh model.
        target = nnx.eval_shape(lambda: served(dtype, Wide(nnx.Rngs(1))))
        assert ckpt.restore(target) == training.RestoredCheckpoint(0, None)
    kernel, stored = target.l2.kernel.get_value(), model.l2.kernel.get_value()
    assert isinstance(kernel, qjax.QArray) and kernel.spec == stored.spec
    assert kernel.data.dtype == stored.data.dtype and kernel.data.shape == stored.data.shape
    np.testing.assert_array_equal(kernel.data, stored.data)
    np.testing.assert_array_equal(FORWARD(target, x), want)
    ratio = quant_bytes / float_bytes
    print(f"{dtype} checkpoint: {quant_bytes} B vs float {float_bytes} B, ratio {ratio:.3f}")
    # Ideal: 8 (or 4) bits + a float32 scale per output channel over 32 bits (~0.25 / ~0.126).
    assert ratio < bound


if __name__ == "__main__":
    child_main(sys.argv[1])
