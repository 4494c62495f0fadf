"""``plugins:`` in a sweep config: its modules are imported before the config is validated (from
``sys.path`` or the current directory), a module that cannot be imported is named with ``sys.path``,
the list is part of the cell hash only when it is not empty, it cannot be a sweep axis, and a Ray
worker imports it before running a cell (``experiments.sweep.parallel.prepare_worker``)."""

import hashlib
import json
import os
import pickle
import subprocess
import sys

import pytest

from experiments.sweep import config as config_lib
from experiments.sweep import validation
from qjax.ste import ESTIMATORS
from tests import ROOT

PLUGIN = """
import qjax


def twice_ste(x, spec, *, key, qparams):
    return qjax.fake_quant(x, spec, "ste", qparams=qparams)


qjax.register_estimator({name!r}, twice_ste)
"""


def config(**extra):
    return {
        "name": "plugins_test",
        "task": {"name": "digits", "model": "mlp"},
        "method": {"name": "ptq"},
        "quant": {"weights": {"dtype": "int4"}},
        **extra,
    }


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A module ``cfg_plugin_mod`` in ``tmp_path`` (on sys.path) registering the estimator ``cfg_est``."""
    (tmp_path / "cfg_plugin_mod.py").write_text(PLUGIN.format(name="cfg_est"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cfg_plugin_mod"
    sys.modules.pop("cfg_plugin_mod", None)
    if "cfg_est" in ESTIMATORS:
        ESTIMATORS.unregister("cfg_est")


def test_plugins_are_imported_before_the_config_is_validated(plugin_module):
    raw = config(plugins=[plugin_module], quant={"weights": {"dtype": "int4"}, "weight_estimator": "cfg_est"})
    spec = config_lib.expand(raw)
    (cell,) = spec.cells()
    assert cell.config.plugins == (plugin_module,)
    assert cell.plan.rules[-1].weight_estimator == "cfg_est"
    assert "cfg_est" in validation.weight_estimators()
    with pytest.raises(
        config_lib.ConfigError,
        match=r"quant\.weight_estimator: 'cfg_es' is not one of .*did you mean 'cfg_est'",
    ):
        config_lib.expand({**raw, "quant": {"weights": {"dtype": "int4"}, "weight_estimator": "cfg_es"}})


def test_a_name_no_plugin_registers_is_refused_with_the_registered_names():
    raw = config(quant={"weights": {"dtype": "int4"}, "weight_estimator": "cfg_est_missing"})
    with pytest.raises(
        config_lib.ConfigError,
        match=r"quant\.weight_estimator: 'cfg_est_missing' is not one of ste, clipped_ste",
    ):
        config_lib.expand(raw)


def test_a_module_that_cannot_be_imported_is_named_with_sys_path():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.expand(config(plugins=["no_such_plugin_module_xyz"]))
    (problem,) = e.value.problems
    assert problem.path == "plugins[0]"
    assert (
        "'no_such_plugin_module_xyz' cannot be imported" in problem.message
        and "sys.path = [" in problem.message
    )
    with pytest.raises(config_lib.ConfigError, match=r"plugins: must be a list of module names"):
        config_lib.expand(config(plugins=[3]))


def test_plugins_cannot_vary_along_an_axis(plugin_module):
    raw = config(sweep={"plugins": [[plugin_module], []]})
    with pytest.raises(
        config_lib.ConfigError, match=r"sweep\.plugins: sets plugins, which is one list for the whole sweep"
    ):
        config_lib.expand(raw)


def test_plugins_are_hashed_only_when_listed(plugin_module):
    plain = config_lib.expand(config()).cells()[0]
    d = {
        k: v
        for k, v in config_lib.to_dict(plain.config).items()
        if k not in (*config_lib.HASH_EXCLUDED, "plugins")
    }
    assert d["quant"].pop("attention") is None  # a null quant.attention is not hashed either
    before = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert plain.hash == before  # configs without plug-ins keep the hashes they had before the key
    listed = config_lib.expand(config(plugins=[plugin_module])).cells()[0]
    assert listed.hash != plain.hash and listed.slug != plain.slug


def test_plugins_are_found_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_plugin_mod.py").write_text(PLUGIN.format(name="cwd_est"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    try:
        config_lib.expand(
            config(
                plugins=["cwd_plugin_mod"],
                quant={"weights": {"dtype": "int4"}, "weight_estimator": "cwd_est"},
            )
        )
        assert "cwd_est" in ESTIMATORS and sys.path[-1] == str(tmp_path)
    finally:
        sys.modules.pop("cwd_plugin_mod", None)
        if "cwd_est" in ESTIMATORS:
            ESTIMATORS.unregister("cwd_est")


WORKER = """
import pickle, sys
from qjax.ste import ESTIMATORS
from experiments.sweep import parallel

cell = pickle.load(open(sys.argv[1], "rb"))  # as a Ray worker receives it
assert "noise" not in ESTIMATORS
parallel.prepare_worker(cell)
print(ESTIMATORS.get(cell.plan.rules[-1].weight_estimator).needs_key)
"""


def test_a_worker_imports_the_plugins_before_the_cell(tmp_path):
    raw = config(
        plugins=["examples.noise_estimator"],
        quant={"weights": {"dtype": "int4"}, "weight_estimator": "noise"},
    )
    (cell,) = config_lib.expand(raw).cells()
    path = tmp_path / "cell.pkl"
    path.write_bytes(pickle.dumps(cell))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
