"""Plug-in estimators: registered by name, used by ``fake_quant`` and ``qjax.nn.Rule`` like the
built-ins, refused with the registered names listed, never replacing a built-in; their value and
gradient are theirs (checked against float64 numpy formulas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.nn import Rule
from qjax.numerics import QuantSpec, SpecError
from qjax.ste import ESTIMATORS, Estimator, estimator_impl, parse_estimator

SPEC = QuantSpec(dtype="int4", granularity="per_channel", axis=-1)


def half_gradient(x, spec, *, key, qparams):
    """Q(x) forward, gradient 1/2: ``Q(x) + (x - sg(x)) / 2``."""
    x_hat = qjax.quantize_dequantize(x, spec, qparams=qparams)
    return jax.lax.stop_gradient(x_hat) + 0.5 * (x - jax.lax.stop_gradient(x))


@pytest.fixture
def half():
    impl = qjax.register_estimator("half_grad", half_gradient)
    yield impl
    ESTIMATORS.unregister("half_grad")


def test_a_registered_estimator_runs_by_name_with_its_own_gradient(half):
    x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float32)
    c = jax.random.normal(jax.random.key(1), (8, 3), jnp.float32)
    f = jax.jit(lambda x: qjax.fake_quant(x, SPEC, "half_grad"))
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(qjax.quantize_dequantize(x, SPEC)))
    grad = jax.grad(lambda x: jnp.sum(c * qjax.fake_quant(x, SPEC, "half_grad")))(x)
    np.testing.assert_allclose(np.asarray(grad, np.float64), 0.5 * np.asarray(c, np.float64), rtol=0, atol=0)
    ste_grad = jax.grad(lambda x: jnp.sum(c * qjax.fake_quant(x, SPEC, "ste")))(x)
    np.testing.assert_array_equal(np.asarray(ste_grad), np.asarray(c))
    assert half == estimator_impl("half_grad") and not half.needs_key and not half.integer_forward
    assert "half_grad" in qjax.estimator_names()


def test_a_rule_takes_a_registered_estimator_by_name(half):
    rule = Rule(
        path=".*", weights={"dtype": "int4"}, activations={"dtype": "int8"}, weight_estimator="half_grad"
    )
    assert rule.weight_estimator == "half_grad" and not isinstance(rule.weight_estimator, Estimator)
    assert rule.activation_estimator is Estimator.STE  # built-ins stay members
    assert hash(rule) == hash(Rule.from_dict({**rule.__dict__}))
    assert Rule(path=".*", activations={"dtype": "int8"}, activation_estimator="half_grad")


def test_unknown_estimators_list_the_plug_ins(half):
    with pytest.raises(
        SpecError,
        match=r"weight_estimator='half_grd' is not one of \['ste', 'clipped_ste', .*'half_grad'\]; "
        r"did you mean 'half_grad'\?",
    ) as e:
        Rule(path=".*", weights={"dtype": "int4"}, weight_estimator="half_grd")
    assert e.value.field == "weight_estimator"
    with pytest.raises(SpecError, match=r"estimator='hlf' is not one of \[.*'half_grad'\]"):
        qjax.fake_quant(jnp.ones(3), QuantSpec(), "hlf")
    assert parse_estimator("lsq") is Estimator.LSQ and parse_estimator("half_grad") == "half_grad"


def test_duplicates_overrides_and_built_in_names(half):
    with pytest.raises(ValueError, match=r"estimator 'half_grad' is already registered; pass override=True"):
        qjax.register_estimator("half_grad", half_gradient)
    replaced = qjax.register_estimator("half_grad", half_gradient, needs_key=True, override=True)
    assert estimator_impl("half_grad") is replaced and replaced.needs_key
    for name in ("ste", "lsq", "pact"):
        with pytest.raises(
            ValueError, match=rf"estimator '{name}' is built into qjax and cannot be replaced"
        ):
            qjax.register_estimator(name, half_gradient, override=True)
    with pytest.raises(TypeError, match=r"fn must be callable"):
        qjax.register_estimator("not_callable", 3)


def test_learned_parameters_belong_to_the_built_ins(half):
    x = jnp.linspace(-1.0, 1.0, 8)
    with pytest.raises(
        ValueError, match=r"scale= is a learned parameter of estimator 'lsq', not of 'half_grad'"
    ):
        qjax.fake_quant(x, QuantSpec(dtype="int4"), "half_grad", scale=jnp.float32(0.1))
    with pytest.raises(ValueError, match=r"integer_offset=True applies to estimator 'lsq_plus'"):
        qjax.fake_quant(x, QuantSpec(dtype="int4"), "half_grad", integer_offset=True)


def test_the_key_reaches_the_estimator_as_given():
    seen = []

    def spy(x, spec, *, key, qparams):
        seen.append((key, qparams))
        return x

    qjax.register_estimator("spy", spy, needs_key=True)
    try:
        key, qp = jax.random.key(0), qjax.calibrate(jnp.ones(4), QuantSpec())
        qjax.fake_quant(jnp.ones(4), QuantSpec(), "spy", key=key, qparams=qp)
        qjax.fake_quant(jnp.ones(4), QuantSpec(), "spy")
    finally:
        ESTIMATORS.unregister("spy")
    assert seen[0][0] is key and seen[0][1] is qp and seen[1] == (None, None)
