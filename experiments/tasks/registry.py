"""The tasks and models that configs name (``task: {name: ..., model: ...}``), open to plug-ins.

A task is registered as

* a **module** (or its dotted name, imported when first used) with ``make_task(data_dir,
  **data_args) -> Task`` and ``MODELS`` (model name -> constructor ``f(*, rngs, **model_args)``),
  and optionally ``batchnorm_pairs(model_name)`` (the pairs :func:`qjax.nn.fold_batchnorm` folds);
  the built-in tasks are such modules (``digits``, ``fashion_mnist``, ``tiny_lm``, ``llm``);
* or a **function** ``make_task(data_dir, **data_args) -> Task`` with its models given as
  ``models=`` or by :func:`register_model`.

:func:`register_model` adds a model to any task, built-in ones included. Names are checked before
any data is loaded, so the model names of a task come from the registration (``MODELS``,
``models=``, :func:`register_model`), not from the :class:`Task` that ``make_task`` returns.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import types
from collections.abc import Callable, Mapping
from typing import Any

import flax.nnx as nnx

from experiments.tasks.base import Task
from qjax.numerics import Registry
from qjax.numerics.fields import did_you_mean

ModelFactory = Callable[..., nnx.Module]  # f(*, rngs, **model_args)

# config name -> module with ``MODELS`` and ``make_task(data_dir) -> Task`` (the built-in tasks)
TASK_MODULES = {
    "digits": "experiments.tasks.digits",
    "fashion_mnist": "experiments.tasks.fashion_mnist",
    "tiny_lm": "experiments.tasks.tiny_lm",
    "llm": "experiments.tasks.llm",
}


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """A registered task: a module (or its dotted name, imported on first use) or a ``make_task``
    function, and the models given at registration."""

    module: types.ModuleType | str | None = None
    make_task: Callable[..., Task] | None = None
    models: Mapping[str, ModelFactory] = dataclasses.field(default_factory=dict)

    def load_module(self) -> types.ModuleType | None:
        if isinstance(self.module, str):
            return importlib.import_module(self.module)
        return self.module


def _unknown_task(registry: Registry[Any], name: object, field: str) -> str:
    names = sorted(registry.names())
    hint = did_you_mean(name, names).removeprefix("; ")
    return f"{field}={name!r} is not a task; {hint + ' ' if hint else ''}use one of {names}"


TASKS: Registry[TaskSource] = Registry("task", "task.name", unknown=_unknown_task)
for _name, _module in TASK_MODULES.items():
    TASKS.register(_name, TaskSource(module=_module))
TASKS.seal()
_MODELS: dict[str, dict[str, ModelFactory]] = {}  # task -> models added by register_model


def register_task(
    name: str,
    task: types.ModuleType | str | Callable[..., Task],
    *,
    models: Mapping[str, ModelFactory] | None = None,
    override: bool = False,
) -> None:
    """Register the task ``name`` (see the module docstring): a module, a module's dotted name,
    or a function ``make_task(data_dir, **data_args) -> Task``; ``models`` adds model constructors.
    Raises ``ValueError`` for a name already registered unless ``override=True`` (the built-in
    tasks are reserved) and ``TypeError`` for anything else.

    .. code-block:: python

        register_task("blobs", make_blobs_task, models={"mlp": BlobMLP})
    """
    if isinstance(task, types.ModuleType):
        for attr in ("make_task", "MODELS"):
            if not hasattr(task, attr):
                raise TypeError(f"task module {task.__name__} has no {attr}; see experiments.tasks.registry")
        source = TaskSource(module=task, models=dict(models or {}))
    elif isinstance(task, str):
        source = TaskSource(module=task, models=dict(models or {}))
    elif callable(task):
        source = TaskSource(make_task=task, models=dict(models or {}))
    else:
        raise TypeError(
            f"register_task({name!r}, task): task must be a module, a module name or a function "
            f"make_task(data_dir, **data_args) -> Task; got {type(task).__name__}"
        )
    TASKS.register(name, source, override=override)
    if override:
        _MODELS.pop(name, None)
    load_task.cache_clear()


def register_model(task: str, name: str, factory: ModelFactory, *, override: bool = False) -> None:
    """Add the model ``name`` to the registered task ``task``: ``factory(*, rngs, **model_args)``
    returns an ``nnx.Module``. Raises ``ValueError`` for a model the task already has, unless
    ``override=True`` (a model of a built-in task's own ``MODELS`` is reserved)."""
    TASKS.get(task)
    if not callable(factory):
        raise TypeError(f"register_model({task!r}, {name!r}, factory): factory must be callable")
    own = _own_models(task)
    if name in own:
        raise ValueError(
            f"model {name!r} is defined by task {task!r} itself; register yours under another name"
        )
    added = _MODELS.setdefault(task, {})
    if name in added and not override:
        raise ValueError(
            f"model {name!r} of task {task!r} is already registered; pass override=True to replace it"
        )
    added[name] = factory


def unregister_task(name: str) -> None:
    """Remove the plug-in task ``name`` and the models registered for it."""
    TASKS.unregister(name)
    _MODELS.pop(name, None)
    load_task.cache_clear()


def unregister_model(task: str, name: str) -> None:
    """Remove a model added by :func:`register_model`."""
    added = _MODELS.get(task, {})
    if name not in added:
        raise KeyError(f"task {task!r} has no registered model {name!r}")
    del added[name]


def task_names() -> tuple[str, ...]:
    """Every registered task: the built-ins, then the plug-ins."""
    return TASKS.names()


def _own_models(task: str) -> dict[str, ModelFactory]:
    source = TASKS.get(task)
    module = source.load_module()
    declared = getattr(module, "MODELS", {}) if module is not None else {}
    if isinstance(declared, Mapping):
        own = dict(declared)
    else:  # names only: the task's make_task builds them (the llm task: its checkpoint's kinds)
        own = {name: _built_by_task(task, name) for name in declared}
    return {**own, **source.models}


def _built_by_task(task: str, name: str) -> ModelFactory:
    def factory(**_: Any) -> Any:
        raise ValueError(
            f"model {name!r} of task {task!r} is built by the task itself: use the task's models "
            "(experiments.tasks.get_task(config).models)"
        )

    return factory


def task_models(task: str) -> dict[str, ModelFactory]:
    """Model name -> constructor of the task ``task`` (its own, then those of :func:`register_model`);
    an unknown task raises ``SpecError`` (a ``ValueError``) listing the registered tasks."""
    return {**_own_models(task), **_MODELS.get(task, {})}


def batchnorm_pairs(task_name: str, model_name: str) -> list[tuple[str, str]]:
    """The ``(layer_path, batchnorm_path)`` pairs of a task's model for :func:`qjax.nn.fold_batchnorm`
    (from the task module's ``batchnorm_pairs`` for its own models; ``[]`` otherwise)."""
    source = TASKS.get(task_name)
    module = source.load_module()
    pairs = getattr(module, "batchnorm_pairs", None)
    if pairs is None or model_name not in getattr(module, "MODELS", {}):
        return []
    return list(pairs(model_name))


def takes_data_args(task_name: str) -> bool:
    """Whether the task takes ``task.data_args``: ``llm`` among the built-ins; every plug-in (its
    ``make_task`` receives them as keywords)."""
    return task_name == "llm" or not TASKS.is_builtin(task_name)


@functools.cache
def load_task(name: str, data_dir: str | None, data_args: tuple[tuple[str, Any], ...] = ()) -> Task:
    """The :class:`Task` of the registered task ``name``, made once per process per arguments."""
    source = TASKS.get(name)
    module = source.load_module()
    make = source.make_task if module is None else module.make_task
    assert make is not None
    task = make(data_dir, **dict(data_args))
    if not isinstance(task, Task):
        raise TypeError(
            f"task {name!r}: make_task returned {type(task).__name__}, not an experiments.tasks.Task"
        )
    return task
