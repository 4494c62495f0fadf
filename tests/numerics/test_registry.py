"""The plug-in registries of the numerics: the registry itself (duplicates, overrides, reserved
built-ins, did-you-mean refusals that list plug-ins), rounding schemes, calibration methods and
number formats registered and used by name (against float64 numpy references), and loading plug-ins
by module name and through ``qjax.plugins`` entry points."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import numerics
from qjax.numerics import QParams, QuantSpec, Registry, SpecError, SpecTypeError
from qjax.numerics.registry import load_entry_points
from qjax.numerics.rounding import ROUNDINGS, Rounding, round_to_integer
from qjax.numerics.spec import CALIBRATIONS
from tests import ROOT


@pytest.fixture
def cleanup():
    """Registered names to remove after the test: ``cleanup.append((registry, name))``."""
    added = []
    yield added
    for registry, name in added:
        if name in registry:
            registry.unregister(name)


# -- the registry ---------------------------------------------------------------------------------


def widgets():
    r = Registry("widget", "widget")
    r.register("round", 1)
    r.register("square", 2)
    r.seal()
    return r


def test_registry_adds_looks_up_and_lists_plug_ins_after_the_built_ins():
    r = widgets()
    assert r.register("hexagon", 6) == 6
    assert r.get("hexagon") == 6 and r.get("round") == 1
    assert r.names() == ("round", "square", "hexagon")
    assert "hexagon" in r and "oval" not in r
    assert r.is_builtin("round") and not r.is_builtin("hexagon")


def test_registry_refuses_duplicates_unless_override_and_never_replaces_built_ins():
    r = widgets()
    r.register("hexagon", 6)
    with pytest.raises(ValueError, match=r"widget 'hexagon' is already registered; pass override=True"):
        r.register("hexagon", 7)
    r.register("hexagon", 7, override=True)
    assert r.get("hexagon") == 7
    with pytest.raises(ValueError, match=r"widget 'round' is built into qjax and cannot be replaced"):
        r.register("round", 0, override=True)
    with pytest.raises(ValueError, match=r"cannot be removed"):
        r.unregister("square")
    r.unregister("hexagon")
    assert "hexagon" not in r
    with pytest.raises(KeyError, match=r"no widget 'hexagon'"):
        r.unregister("hexagon")


@pytest.mark.parametrize("name", ["", "2d", "has space", "a/b", None, 3])
def test_registry_refuses_names_a_config_cannot_write(name):
    with pytest.raises(ValueError, match=r"must be a string of letters"):
        widgets().register(name, 0)


def test_unknown_names_list_built_ins_and_plug_ins_with_a_suggestion():
    r = widgets()
    r.register("hexagon", 6)
    with pytest.raises(
        SpecError,
        match=r"widget='hexagn' is not one of \['round', 'square', 'hexagon'\]; did you mean 'hexagon'\?",
    ) as e:
        r.get("hexagn")
    assert e.value.field == "widget"
    with pytest.raises(SpecError) as e:
        r.get("oval", "shape")
    assert e.value.field == "shape" and str(e.value).startswith("shape='oval' is not one of")
    with pytest.raises(SpecTypeError, match=r"widget=3 must be a string such as 'round'; got int"):
        r.get(3)


# -- rounding schemes -------------------------------------------------------------------------------


def half_away(y, noise):
    return jnp.sign(y) * jnp.floor(jnp.abs(y) + 0.5)


def int4_reference(x, rounded, scale=None):
    """numpy, step by step in float32 as the quantizer computes: per-tensor symmetric int4 with
    ``S = max|x| * fl(1/7)`` (or ``scale``), ``q = clip(rounded(x * fl(1/S)), -7, 7)``, ``q * S``;
    returned as float64."""
    x = np.asarray(x, np.float32)
    s = np.float32(np.max(np.abs(x)) * np.float32(1.0 / 7)) if scale is None else np.float32(scale)
    y = x * (np.float32(1.0) / s)
    return (np.clip(rounded(y), -7, 7).astype(np.float32) * s).astype(np.float64)


def test_a_registered_rounding_scheme_is_used_by_name(cleanup):
    numerics.register_rounding("half_away", half_away)
    cleanup.append((ROUNDINGS, "half_away"))
    spec = QuantSpec(dtype="int4", rounding="half_away")
    assert spec.rounding == "half_away" and not isinstance(spec.rounding, Rounding)
    again = QuantSpec.from_dict(spec.to_dict())
    assert again == spec and hash(again) == hash(spec)
    # S = 0.5 exactly: x / S = 2x, halves included
    x = jnp.asarray([-3.5, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.55, 3.5], jnp.float32)
    qp = QParams(scale=jnp.float32(0.5))
    got = np.asarray(jax.jit(qjax.quantize_dequantize, static_argnums=1)(x, spec, qparams=qp), np.float64)
    np.testing.assert_array_equal(
        got, int4_reference(x, lambda y: np.sign(y) * np.floor(np.abs(y) + 0.5), 0.5)
    )
    np.testing.assert_array_equal(got, 0.5 * np.asarray([-7, -3, -2, -1, 1, 2, 3, 3, 7]))
    nearest = qjax.quantize_dequantize(x, QuantSpec(dtype="int4"), qparams=qp)  # halves to even
    np.testing.assert_array_equal(np.asarray(nearest), 0.5 * np.asarray([-7, -2, -2, 0, 0, 2, 2, 3, 7]))
    y = jax.random.normal(jax.random.key(0), (300,), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(qjax.quantize_dequantize(y, spec), np.float64),
        int4_reference(y, lambda v: np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))),
    )


def test_a_rounding_scheme_applies_to_float_grids_too(cleanup):
    numerics.register_rounding("half_away", half_away)
    cleanup.append((ROUNDINGS, "half_away"))
    # e4m3 steps: 0.125 on [1, 2), 0.25 on [2, 4); these values are ties
    x = jnp.asarray([1.0625, -1.0625, 2.125, 1.1875, 0.3], jnp.float32)
    qp = QParams(scale=jnp.float32(1.0))
    got = qjax.quantize_dequantize(x, QuantSpec(dtype="float8_e4m3fn", rounding="half_away"), qparams=qp)
    nearest = qjax.quantize_dequantize(x, QuantSpec(dtype="float8_e4m3fn"), qparams=qp)
    np.testing.assert_array_equal(np.asarray(got)[:4], [1.125, -1.125, 2.25, 1.25])
    np.testing.assert_array_equal(np.asarray(nearest)[:4], [1.0, -1.0, 2.0, 1.25])
    assert got[4] == nearest[4]  # not a tie


def test_a_rounding_scheme_that_draws_noise_needs_a_key(cleanup):
    numerics.register_rounding("dither", lambda y, noise: jnp.round(y + noise - 0.5), needs_noise=True)
    cleanup.append((ROUNDINGS, "dither"))
    spec = QuantSpec(dtype="int4", rounding="dither")
    assert numerics.rounding.needs_key("dither") and not numerics.rounding.needs_key("floor")
    x = jnp.linspace(-3.0, 3.0, 64, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"rounding='dither' needs a PRNG key"):
        qjax.quantize_dequantize(x, spec)
    key = jax.random.key(3)
    got = np.asarray(qjax.quantize_dequantize(x, spec, key=key), np.float64)
    noise = np.asarray(jax.random.uniform(key, x.shape, jnp.float32))
    np.testing.assert_array_equal(got, int4_reference(x, lambda y: np.round(y + noise - np.float32(0.5))))


def test_unknown_rounding_lists_plug_ins_and_built_ins_stay_members(cleanup):
    numerics.register_rounding("half_away", half_away)
    cleanup.append((ROUNDINGS, "half_away"))
    with pytest.raises(
        SpecError,
        match=r"rounding='half_awy' is not one of \[.*'ceil', 'half_away'\]; did you mean 'half_away'",
    ) as e:
        QuantSpec(rounding="half_awy")
    assert e.value.field == "rounding"
    assert QuantSpec(rounding="floor").rounding is Rounding.FLOOR
    with pytest.raises(ValueError, match=r"already registered"):
        numerics.register_rounding("half_away", half_away)
    numerics.register_rounding("half_away", lambda y, noise: jnp.ceil(y), override=True)
    assert float(round_to_integer(jnp.float32(0.2), "half_away")) == 1.0
    with pytest.raises(ValueError, match=r"built into qjax"):
        numerics.register_rounding("nearest", half_away, override=True)


# -- calibration methods --------------------------------------------------------------------------


def absmean3(blocks, spec):
    a = 3.0 * jnp.mean(jnp.abs(blocks), axis=-1)
    return -a, a


def test_a_registered_calibration_method_is_used_by_name_per_block(cleanup):
    numerics.register_calibration("absmean3", absmean3)
    cleanup.append((CALIBRATIONS, "absmean3"))
    spec = QuantSpec(dtype="int8", granularity="per_channel", axis=-1, calibration="absmean3")
    x = jax.random.normal(jax.random.key(0), (32, 5), jnp.float32) * jnp.arange(1.0, 6.0)[None, :]
    qp = qjax.calibrate(x, spec)
    ref_scale = 3.0 * np.mean(np.abs(np.asarray(x, np.float64)), axis=0) / 127.0
    assert qp.scale.shape == (1, 5)
    np.testing.assert_allclose(np.asarray(qp.scale, np.float64)[0], ref_scale, rtol=1e-6)
    got = np.asarray(qjax.quantize_dequantize(x, spec))
    s = np.asarray(qp.scale)
    ref = np.clip(np.round(np.asarray(x) * (np.float32(1.0) / s)), -127, 127).astype(np.float32) * s
    np.testing.assert_array_equal(got, ref)
    assert np.max(np.abs(got)) < np.max(np.abs(np.asarray(x)))  # 3 mean|x| clips the tails


def test_unknown_calibration_lists_plug_ins_and_duplicates_are_refused(cleanup):
    numerics.register_calibration("absmean3", absmean3)
    cleanup.append((CALIBRATIONS, "absmean3"))
    with pytest.raises(
        SpecError,
        match=r"calibration='absmean' is not one of \['minmax', 'percentile', 'mse', 'absmean3'\]; "
        r"did you mean 'absmean3'",
    ):
        QuantSpec(calibration="absmean")
    with pytest.raises(ValueError, match=r"already registered"):
        numerics.register_calibration("absmean3", absmean3)
    numerics.register_calibration(
        "absmean3", lambda b, s: (-jnp.max(jnp.abs(b), -1), jnp.max(jnp.abs(b), -1)), override=True
    )
    x = jnp.asarray([1.0, -2.0, 4.0], jnp.float32)
    scale = qjax.calibrate(x, QuantSpec(calibration="absmean3")).scale
    assert np.asarray(scale).item() == np.float32(4 / 127)  # the replacement (max) is used
    with pytest.raises(ValueError, match=r"built into qjax"):
        numerics.register_calibration("mse", absmean3, override=True)


# -- number formats ---------------------------------------------------------------------------------


class Ternary(numerics.CustomFormat):
    """{-1, 0, +1} times a per-block scale S = max|x| (a ternary-weight format)."""

    name = "ternary"
    container_bits = 2
    value_dtype = jnp.dtype(jnp.int8)

    def qparams(self, lo, hi, symmetric):
        return QParams(scale=jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), 1e-30))

    def encode(self, x, qp, rounding, noise):
        return jnp.clip(round_to_integer(x * (1.0 / qp.scale), rounding, noise), -1, 1).astype(jnp.int32)

    def decode(self, values, qp):
        return values.astype(jnp.float32) * qp.scale

    def clip_range(self, qp):
        return -qp.scale, qp.scale


def ternary_reference(x):
    """numpy: S = max|x| per column, q = clip(round(x * fl(1/S)), -1, 1), q * S."""
    x = np.asarray(x, np.float32)
    s = np.max(np.abs(x), axis=0, keepdims=True)
    return np.clip(np.round(x * (np.float32(1.0) / s)), -1, 1).astype(np.float32) * s


@pytest.fixture
def ternary():
    fmt = numerics.register_format(Ternary())
    yield fmt
    numerics.formats.FORMATS.unregister("ternary")


def test_a_registered_format_masks_the_clipped_ste_outside_its_clip_range(ternary):
    """``CustomFormat.unclipped`` defaults to ``lo <= x <= hi`` of ``clip_range``."""
    spec = QuantSpec(dtype="ternary", granularity="per_channel", axis=-1)
    x = jax.random.normal(jax.random.key(2), (6, 4), jnp.float32)
    qp = QParams(scale=jnp.full((1, 4), 0.5, jnp.float32))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(qjax.fake_quant(x, spec, "clipped_ste", qparams=qp))))(x)
    inside = np.abs(np.asarray(x)) <= 0.5
    assert np.any(inside) and np.any(~inside)
    np.testing.assert_array_equal(np.asarray(grad), inside.astype(np.float32))


def test_a_registered_format_quantizes_and_stores_by_name(ternary):
    spec = QuantSpec(dtype="ternary", granularity="per_channel", axis=-1)
    x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float32)
    got = np.asarray(qjax.quantize_dequantize(x, spec))
    ref = ternary_reference(x)
    np.testing.assert_array_equal(got, ref)
    assert len(np.unique(got[:, 0])) <= 3 and np.all(
        np.abs(got) == np.max(np.abs(np.asarray(x)), 0) * (got != 0)
    )
    q = qjax.quantize(x, spec)
    assert q.packed and q.data.shape == (6, 1)  # 4 two-bit values in one byte
    np.testing.assert_array_equal(np.asarray(q.values), np.round(ref / np.max(np.abs(np.asarray(x)), 0)))
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(q)), got)
    assert spec.bits == 2.0 and "ternary" in numerics.format_names()
    assert "ternary" not in qjax.FORMAT_NAMES  # the built-ins


def test_formats_refuse_unknown_names_listing_plug_ins_and_bad_plug_ins(ternary):
    with pytest.raises(
        SpecError,
        match=r"dtype='ternery' is not a known format; did you mean 'ternary'\? "
        r"Known formats: int2.*kmeans8, ternary",
    ):
        QuantSpec(dtype="ternery")
    with pytest.raises(ValueError, match=r"already registered"):
        numerics.register_format(Ternary())
    assert numerics.register_format(Ternary(), override=True).name == "ternary"
    with pytest.raises(TypeError, match=r"needs an instance of qjax.numerics.CustomFormat"):
        numerics.register_format(object())

    class Wide(Ternary):
        name = "wide"
        container_bits = 16

    with pytest.raises(ValueError, match=r"container_bits=16 must be an int in 1..8"):
        numerics.register_format(Wide())

    class Int4(Ternary):
        name = "int4"

    with pytest.raises(ValueError, match=r"format 'int4' is built into qjax"):
        numerics.register_format(Int4(), override=True)


# -- loading plug-ins ------------------------------------------------------------------------------


def test_load_plugins_names_a_missing_module_and_sys_path():
    with pytest.raises(
        qjax.PluginError, match=r"plug-in module 'no_such_plugin_mod' cannot be imported.*sys\.path = \["
    ):
        qjax.load_plugins(["no_such_plugin_mod"], entry_points=False)


def test_load_plugins_reports_an_error_inside_the_module(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin_mod.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        qjax.PluginError, match=r"'broken_plugin_mod' failed while being imported: ModuleNotFoundError"
    ):
        qjax.load_plugins(["broken_plugin_mod"], entry_points=False)


def write_plugin(directory, module, rounding):
    (directory / f"{module}.py").write_text(
        textwrap.dedent(f"""
        import jax.numpy as jnp
        from qjax.numerics import register_rounding

        CALLS = []

        def register():
            CALLS.append(1)
            register_rounding({rounding!r}, lambda y, noise: jnp.trunc(y))
        """)
    )


def test_load_plugins_imports_a_module_that_registers_names(tmp_path, monkeypatch, cleanup):
    (tmp_path / "trunc_plugin_mod.py").write_text(
        "import jax.numpy as jnp\nfrom qjax.numerics import register_rounding\n"
        "register_rounding('trunc_mod', lambda y, noise: jnp.trunc(y))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cleanup.append((ROUNDINGS, "trunc_mod"))
    qjax.load_plugins(["trunc_plugin_mod"], entry_points=False)
    assert float(round_to_integer(jnp.float32(-1.7), QuantSpec(rounding="trunc_mod").rounding)) == -1.0
    sys.modules.pop("trunc_plugin_mod")


def test_entry_points_are_loaded_once_and_called(tmp_path, monkeypatch, cleanup):
    write_plugin(tmp_path, "ep_plugin_mod", "trunc_ep")
    monkeypatch.syspath_prepend(str(tmp_path))
    cleanup.append((ROUNDINGS, "trunc_ep"))
    found = [importlib.metadata.EntryPoint("trunc", "ep_plugin_mod:register", "qjax.plugins")]
    asked = []

    def entry_points(group):
        asked.append(group)
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert load_entry_points(rescan=True) == ["trunc"]
    assert asked == ["qjax.plugins"] and QuantSpec(rounding="trunc_ep").rounding == "trunc_ep"
    assert load_entry_points(rescan=True) == []  # each entry point at most once
    assert load_entry_points() == []  # scanned already
    assert sys.modules["ep_plugin_mod"].CALLS == [1]
    sys.modules.pop("ep_plugin_mod")


def test_a_failing_entry_point_is_named(monkeypatch):
    found = [importlib.metadata.EntryPoint("bad", "no_such_ep_module_xyz:register", "qjax.plugins")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: found)
    with pytest.raises(
        qjax.PluginError, match=r"entry point bad = no_such_ep_module_xyz:register \(group 'qjax.plugins'"
    ):
        load_entry_points(rescan=True)


def test_an_installed_entry_point_loads_on_the_first_unknown_name(tmp_path):
    """A package on sys.path with a dist-info directory declaring the entry point: a fresh process
    resolves the plug-in's name on first use, without importing the plug-in itself."""
    write_plugin(tmp_path, "qjaxdemo_plugin", "trunc_installed")
    info = tmp_path / "qjaxdemo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qjaxdemo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qjax.plugins]\ntrunc = qjaxdemo_plugin:register\n")
    code = (
        "import sys, qjax\n"
        "assert 'qjaxdemo_plugin' not in sys.modules\n"
        "print(qjax.QuantSpec(rounding='trunc_installed').rounding, sys.modules['qjaxdemo_plugin'].CALLS)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["trunc_installed", "[1]"]
