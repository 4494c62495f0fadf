"""Make silent mistakes loud: strict dtype promotion, no implicit rank promotion."""

import contextlib
import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "default",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    """``test_multidevice_*`` tests need 8 (simulated) devices: with fewer they are deselected here
    and run by ``tests/training/test_sharding.py::test_eight_device_tests_in_subprocess``, which starts a
    pytest process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and requires them
    to pass. With 8 devices, that subprocess test is the one deselected."""
    eight = jax.device_count() >= 8
    keep, drop = [], []
    for item in items:
        multi = item.name.startswith("test_multidevice_")
        runner = item.name == "test_eight_device_tests_in_subprocess"
        (drop if (multi and not eight) or (runner and eight) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def lowered():
    """``lowered(jitted, *args, platform=..., **kwargs)``: the text of ``jitted.trace(*args, **kwargs)
    .lower(lowering_platforms=(platform,))``.

    jax >= 0.11 asks which GPU a Triton kernel targets (its compute capability) when it lowers and
    refuses on a host without one; there, tracing and lowering for ``cuda`` name an abstract H100
    (sm_90). On a GPU host the GPU that is there is the target."""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    def lower(jitted, *args, platform: str, **kwargs) -> str:
        if platform != "cuda" or any(d.platform == "gpu" for d in jax.devices()):
            target = contextlib.nullcontext()
        else:
            h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
            target = use_abstract_mesh(AbstractMesh((1,), ("_",), abstract_device=h100))
        with target:
            return jitted.trace(*args, **kwargs).lower(lowering_platforms=(platform,)).as_text()

    return lower
