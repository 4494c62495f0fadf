"""The ``blobs`` example task: registered by name with its model, the same data in every call (and
so every process), and learnable."""

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np
import optax

from experiments.sweep.schema import TaskConfig
from experiments.tasks import evaluate, get_task, task_models, task_names
from qjax.training import make_optimizer, make_train_step


def test_blobs_is_a_task_with_its_model(plugin):
    blobs_task = plugin("blobs_task")
    assert "blobs" in task_names() and set(task_models("blobs")) == {"mlp"}
    task = get_task(TaskConfig(name="blobs", model="mlp", data_args={"n_train": 256, "n_test": 64}))
    assert task.train.x.shape == (256, 16) and task.test.x.shape == (64, 16)
    assert task.train.x.dtype == np.float32 and set(np.unique(task.train.y)) == {0, 1, 2, 3}
    again = blobs_task.make_blobs(n_train=256, n_test=64)
    assert again.checksum == task.checksum and np.array_equal(again.train.x, task.train.x)
    model = task.make_model("mlp", {"hidden": 8}, seed=0)
    assert model.fc1.kernel.shape == (16, 8) and model(jnp.asarray(task.test.x)).shape == (64, 4)


def test_the_model_learns_the_blobs(plugin):
    plugin("blobs_task")
    task = get_task(TaskConfig(name="blobs", model="mlp"))
    model = task.make_model("mlp", {}, seed=0)
    optimizer = make_optimizer(model, optax.adam(0.01))
    step = make_train_step(task.loss)
    model.train()
    for i in range(60):
        idx = np.arange(i * 64, (i + 1) * 64) % len(task.train)
        step(model, optimizer, task.train.take(idx))
    model.eval()
    assert evaluate(task, model, 256)["accuracy"] > 0.95
    assert isinstance(model, nnx.Module)
