"""The example plug-ins register their names when imported. Every test here imports them itself
(the ``plugin`` fixture) and leaves the registries and ``sys.modules`` as it found them, so no other
test sees ``noise``, ``dorefa`` or ``blobs``."""

import importlib
import sys

import pytest

from experiments.tasks import task_names, unregister_task
from qjax.numerics.formats import FORMATS
from qjax.numerics.rounding import ROUNDINGS
from qjax.numerics.spec import CALIBRATIONS
from qjax.ste import ESTIMATORS

REGISTRIES = (ESTIMATORS, ROUNDINGS, CALIBRATIONS, FORMATS)


@pytest.fixture(autouse=True)
def isolated_registries():
    names = {registry: set(registry.names()) for registry in REGISTRIES}
    tasks = set(task_names())
    modules = set(sys.modules)
    yield
    for registry, before in names.items():
        for name in set(registry.names()) - before:
            registry.unregister(name)
    for name in set(task_names()) - tasks:
        unregister_task(name)
    for name in set(sys.modules) - modules:
        if name == "examples" or name.startswith("examples."):
            del sys.modules[name]


@pytest.fixture
def plugin():
    """``plugin("noise_estimator")``: the example module, imported (and so registered) for this test."""
    return lambda name: importlib.import_module(f"examples.{name}")
