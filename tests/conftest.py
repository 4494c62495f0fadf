"""Make silent mistakes loud: strict dtype promotion, no implicit rank promotion. Compile each
program once per test run: a persistent compilation cache shared by the test processes."""

import contextlib
import os
import shutil
import tempfile

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# One XLA compilation cache for the whole test run, in a fresh directory: the process pytest starts
# in makes it and removes it at the end; xdist workers and the processes tests start (qjax-run,
# the 8-device pytest) inherit it through the environment. Many tests compile the same programs
# (every sweep of the digits smoke config; a killed and resumed run; each hypothesis example's
# fresh jit), and a cache hit loads the executable XLA compiled for the same program, so what runs
# is unchanged. An unreadable entry (one a killed process left half-written) is compiled again.
CACHE_DIR_VAR = "JAX_COMPILATION_CACHE_DIR"
OWN_CACHE_DIR = CACHE_DIR_VAR not in os.environ
if OWN_CACHE_DIR:
    os.environ[CACHE_DIR_VAR] = tempfile.mkdtemp(prefix="qjax-tests-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_DIR_VAR])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")),
)


def pytest_configure(config):
    for what in ("reading", "writing"):
        config.addinivalue_line(
            "filterwarnings", f"ignore:Error {what} persistent compilation cache entry:UserWarning"
        )


def pytest_unconfigure(config):
    if OWN_CACHE_DIR:
        shutil.rmtree(os.environ[CACHE_DIR_VAR], ignore_errors=True)


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
    to pass. With 8 devices, that subprocess test is the one deselected.

    The subprocess test runs first: it takes tens of seconds and its file comes last in the
    collection, where it kept one xdist worker busy after the other had run out of tests."""
    eight = jax.device_count() >= 8
    first, keep, drop = [], [], []
    for item in items:
        multi = item.name.startswith("test_multidevice_")
        runner = item.name == "test_eight_device_tests_in_subprocess"
        if (multi and not eight) or (runner and eight):
            drop.append(item)
        else:
            (first if runner else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = first + keep


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
