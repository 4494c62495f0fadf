"""The task registry: plug-in tasks (a function or a module) and models (on plug-in and built-in
tasks) are found by name, refused names list them, duplicates need ``override``, built-ins are
reserved."""

import types

import flax.nnx as nnx
import numpy as np
import pytest

from experiments.sweep.schema import TaskConfig
from experiments.tasks import (
    Task,
    batchnorm_pairs,
    classification_task,
    get_task,
    register_model,
    register_task,
    task_models,
    task_names,
    unregister_model,
    unregister_task,
)
from qjax.numerics import SpecError


class Tiny(nnx.Module):
    def __init__(self, width: int = 3, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(2, width, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def make_pairs(data_dir=None, *, n=8):
    x = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    y = (np.arange(n) % 3).astype(np.int32)
    return classification_task("pairs", (x, y, x, y), {}, "0" * 64, f"{n} pairs")


@pytest.fixture
def pairs():
    register_task("pairs", make_pairs, models={"tiny": Tiny})
    yield
    unregister_task("pairs")


def test_a_registered_task_function_is_found_with_its_models(pairs):
    assert task_names()[:4] == ("digits", "fashion_mnist", "tiny_lm", "llm") and "pairs" in task_names()
    task = get_task(TaskConfig(name="pairs", model="tiny", data_args={"n": 6}))
    assert isinstance(task, Task) and len(task.train) == 6 and task.description == "6 pairs"
    assert task.make_model("tiny", {"width": 5}, 0).fc.kernel.shape == (2, 5)
    assert batchnorm_pairs("pairs", "tiny") == []


def test_models_are_added_to_plug_in_and_built_in_tasks(pairs):
    register_model("pairs", "wide", lambda *, rngs: Tiny(7, rngs=rngs))
    register_model("digits", "tiny_pairs", Tiny)
    try:
        assert set(task_models("pairs")) == {"tiny", "wide"}
        assert set(task_models("digits")) == {"mlp", "cnn", "tiny_pairs"}
        assert get_task(TaskConfig(name="pairs", model="wide")).make_model("wide", {}, 0).fc.kernel.shape == (
            2,
            7,
        )
        digits = get_task(TaskConfig(name="digits", model="tiny_pairs"))
        assert {"mlp", "cnn", "tiny_pairs"} <= set(digits.models)
        with pytest.raises(ValueError, match=r"model 'wide' of task 'pairs' is already registered"):
            register_model("pairs", "wide", Tiny)
        register_model("pairs", "wide", Tiny, override=True)
        with pytest.raises(ValueError, match=r"model 'mlp' is defined by task 'digits' itself"):
            register_model("digits", "mlp", Tiny, override=True)
    finally:
        unregister_model("digits", "tiny_pairs")
    assert "tiny_pairs" not in task_models("digits")


def test_unknown_names_list_the_plug_ins(pairs):
    with pytest.raises(
        SpecError, match=r"task\.name='pair' is not a task; did you mean 'pairs'\? use one of \[.*'pairs'"
    ):
        get_task(TaskConfig(name="pair", model="tiny"))
    with pytest.raises(
        ValueError, match=r"task\.model='tin' is not a model of task 'pairs'; did you mean 'tiny'\?"
    ):
        get_task(TaskConfig(name="pairs", model="tin"))
    with pytest.raises(SpecError, match=r"is not a task"):
        register_model("no_task", "m", Tiny)


def test_duplicates_overrides_and_built_ins(pairs):
    with pytest.raises(ValueError, match=r"task 'pairs' is already registered; pass override=True"):
        register_task("pairs", make_pairs)
    register_task("pairs", lambda data_dir=None: make_pairs(n=4), models={"tiny": Tiny}, override=True)
    assert len(get_task(TaskConfig(name="pairs", model="tiny")).train) == 4  # not the cached one
    with pytest.raises(ValueError, match=r"task 'digits' is built into qjax"):
        register_task("digits", make_pairs, override=True)
    with pytest.raises(TypeError, match=r"task must be a module, a module name or a function"):
        register_task("bad", 3)


def test_a_task_module_is_registered_like_the_built_ins():
    module = types.ModuleType("pairs_module")
    module.make_task = make_pairs
    module.MODELS = {"tiny": Tiny}
    register_task("pairs_mod", module)
    try:
        assert set(task_models("pairs_mod")) == {"tiny"}
    finally:
        unregister_task("pairs_mod")
    with pytest.raises(TypeError, match=r"task module half has no make_task"):
        register_task("half", types.ModuleType("half"))
