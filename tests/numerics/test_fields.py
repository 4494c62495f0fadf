"""Config errors carry the field at fault (``SpecError.field``), so callers never parse their wording."""

import enum

import pytest

import qjax
from qjax import QuantSpec, SpecError, SpecTypeError
from qjax.numerics.fields import did_you_mean, parse_enum, reject_unknown_fields


class Colour(enum.StrEnum):
    RED = "red"
    GREEN = "green"


def test_parse_enum_takes_members_and_values():
    assert parse_enum(Colour, "red", "colour") is Colour.RED
    assert parse_enum(Colour, Colour.GREEN, "colour") is Colour.GREEN


def test_parse_enum_names_the_argument_and_suggests():
    with pytest.raises(
        SpecError, match=r"colour='gren' is not one of \['red', 'green'\]; did you mean 'green'\?"
    ) as e:
        parse_enum(Colour, "gren", "colour")
    assert e.value.field == "colour"
    assert isinstance(e.value, ValueError)


def test_parse_enum_without_a_close_value_lists_the_choices():
    with pytest.raises(SpecError, match=r"colour='blue' is not one of \['red', 'green'\]$"):
        parse_enum(Colour, "blue", "colour")


def test_did_you_mean():
    assert did_you_mean("gren", ["red", "green"]) == "; did you mean 'green'?"
    assert did_you_mean("zzz", ["red", "green"]) == ""


def test_reject_unknown_fields_names_the_first_unknown_key():
    reject_unknown_fields("Thing", ["a", "b"], ["a", "b", "c"])
    with pytest.raises(SpecError, match=r"unknown Thing field 'bb'; did you mean 'b'\? Fields: a, b, c") as e:
        reject_unknown_fields("Thing", ["a", "bb", "zz"], ["a", "b", "c"])
    assert e.value.field == "bb"


@pytest.mark.parametrize(
    ("kwargs", "field", "kind"),
    [
        ({"dtype": "in8"}, "dtype", SpecError),
        ({"dtype": 8}, "dtype", SpecTypeError),
        ({"granularity": "per_chanel"}, "granularity", SpecError),
        ({"rounding": "nearst"}, "rounding", SpecError),
        ({"calibration": "mean"}, "calibration", SpecError),
        ({"granularity": "per_channel", "axis": "x"}, "axis", SpecTypeError),
        ({"symmetric": "yes"}, "symmetric", SpecTypeError),
        ({"dtype": "mxfp4"}, "dtype", SpecError),
        (
            {"dtype": "mxfp4", "granularity": "per_group", "axis": 0, "group_size": 16},
            "group_size",
            SpecError,
        ),
        ({"granularity": "per_channel"}, "granularity", SpecError),
        ({"granularity": "per_group", "axis": (0, 2), "group_size": 4}, "granularity", SpecError),
        ({"granularity": "per_group", "axis": 0}, "granularity", SpecError),
        ({"group_size": 32}, "group_size", SpecError),
        ({"granularity": "per_block"}, "granularity", SpecError),
        ({"block_shape": (2, 2)}, "block_shape", SpecError),
        ({"axis": 0}, "axis", SpecError),
        ({"dtype": "float8_e4m3fn", "symmetric": False}, "dtype", SpecError),
        ({"dtype": "kmeans4", "granularity": "per_token"}, "dtype", SpecError),
        ({"dtype": "kmeans4", "calibration": "mse"}, "dtype", SpecError),
        ({"percentile": 40.0}, "percentile", SpecError),
        ({"mse_grid": 1}, "mse_grid", SpecError),
        ({"kmeans_iters": 0}, "kmeans_iters", SpecError),
    ],
)
def test_quant_spec_errors_name_their_field(kwargs, field, kind):
    with pytest.raises(kind) as e:
        QuantSpec(**kwargs)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}=")  # the message names the same field


def test_quant_spec_from_dict_errors():
    with pytest.raises(SpecError, match="unknown QuantSpec field 'dtyp'") as e:
        QuantSpec.from_dict({"dtyp": "int8"})
    assert e.value.field == "dtyp"
    with pytest.raises(SpecTypeError, match="a QuantSpec needs a mapping") as t:
        QuantSpec.from_dict(["int8"])
    assert t.value.field is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": "blocks/(0"}, "path"),
        ({"path": ".*", "weights": {"dtyp": "int8"}}, "dtyp"),
        ({"path": ".*", "weight_estimator": "lsqq"}, "weight_estimator"),
        ({"path": ".*", "weight_estimator": "pact"}, "weight_estimator"),
        ({"path": ".*", "weight_estimator": "kmeans_finetune"}, "weight_estimator"),
        ({"path": ".*", "activation_estimator": "kmeans_finetune"}, "activation_estimator"),
        (
            {"path": ".*", "activations": {"dtype": "int8"}, "activation_estimator": "lsq_plus"},
            "activation_estimator",
        ),
        ({"path": ".*", "activation_scale": "statc"}, "activation_scale"),
        (
            {
                "path": ".*",
                "activations": {"dtype": "int8", "granularity": "per_token"},
                "activation_scale": "static",
            },
            "activation_scale",
        ),
        ({"path": ".*", "observer": "hist"}, "observer"),
        ({"path": ".*", "ste_residuals": "both"}, "ste_residuals"),
        ({"path": ".*", "ema_decay": 1.0}, "ema_decay"),
        ({"path": ".*", "histogram_bins": 8}, "histogram_bins"),
    ],
)
def test_rule_errors_name_their_field(kwargs, field):
    with pytest.raises(SpecError) as e:
        qjax.nn.Rule(**kwargs)
    assert e.value.field == field


def test_rule_type_errors_name_their_field():
    with pytest.raises(SpecTypeError) as e:
        qjax.nn.Rule(path=3)
    assert e.value.field == "path"
    with pytest.raises(SpecTypeError) as e:
        qjax.nn.Rule(path=".*", weights="int8")
    assert e.value.field == "weights"


def test_rule_from_dict_names_the_unknown_key():
    with pytest.raises(SpecError, match=r"unknown Rule field 'weight'") as e:
        qjax.nn.Rule.from_dict({"path": ".*", "weight": {}})
    assert e.value.field == "weight"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"iterations": 0}, "iterations"),
        ({"samples": 0}, "samples"),
        ({"lr": 0.0}, "lr"),
        ({"lambda_": -1.0}, "lambda_"),
        ({"beta_end": 0.0}, "beta_end"),
        ({"beta_start": 1.0}, "beta_start"),
        ({"warmup": 1.0}, "warmup"),
    ],
)
def test_adaround_config_errors_name_their_field(kwargs, field):
    with pytest.raises(SpecError) as e:
        qjax.methods.AdaRoundConfig(**kwargs)
    assert e.value.field == field


def test_adaround_config_from_dict_names_the_unknown_key():
    with pytest.raises(SpecError, match="unknown AdaRoundConfig field 'iteration'") as e:
        qjax.methods.AdaRoundConfig.from_dict({"iteration": 3})
    assert e.value.field == "iteration"


def test_fake_quant_dot_general_names_the_estimator_field():
    with pytest.raises(SpecError, match="Linen layers hold no learned quantizer state") as e:
        qjax.nn.FakeQuantDotGeneral(activation_estimator="lsq")
    assert e.value.field == "activation_estimator"
    assert (
        qjax.nn.FakeQuantDotGeneral(weight_estimator="clipped_ste").weight_estimator
        is qjax.Estimator.CLIPPED_STE
    )
