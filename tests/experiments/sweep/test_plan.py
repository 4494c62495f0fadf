"""Config strings become typed values once: enum fields at build time, QuantSpecs and Rules in the plan."""

import textwrap

import pytest
import yaml

import qjax
from experiments.sweep import config, run, validation
from experiments.sweep.plan import Plan
from experiments.sweep.schema import ExperimentConfig, LearnedRounding, Method, Optimizer, Plot, Schedule
from tests import ROOT

QUANT = """
method: {name: ptq}
task: {name: digits, model: mlp}
quant:
  weights: {dtype: int4, granularity: per_channel, axis: -1}
  activations: {dtype: int8}
  weight_estimator: lsq
  overrides:
    - {path: fc1, keep_float: true}
    - {path: fc2, weights: {dtype: int8}}
    - {path: head, activation_estimator: pact}
"""


def load(tmp_path, text, overrides=()):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text))
    return config.load(path, overrides)


def test_enum_fields_are_members_and_written_back_as_values(tmp_path):
    text = """
        method: {name: qat, rounding: adaround, optimizer: sgd, schedule: constant}
        quant: {weights: {dtype: int8}}
        train: {optimizer: adamw, schedule: warmup_cosine}
        report: {plot: line}
    """
    cfg = load(tmp_path, text).base
    assert cfg.method.name is Method.QAT and cfg.method.rounding is LearnedRounding.ADAROUND
    assert cfg.method.optimizer is Optimizer.SGD and cfg.method.schedule is Schedule.CONSTANT
    assert cfg.train.optimizer is Optimizer.ADAMW and cfg.train.schedule is Schedule.WARMUP_COSINE
    assert cfg.report.plot is Plot.LINE
    d = config.to_dict(cfg)
    assert d["method"]["name"] == "qat" and type(d["method"]["name"]) is str
    assert type(d["train"]["optimizer"]) is str and type(d["report"]["plot"]) is str
    assert config.from_dict(yaml.safe_load(config.dump_yaml(cfg))) == cfg
    assert config.to_dict(ExperimentConfig())["method"]["name"] == "float"


def test_an_enum_field_refuses_other_types(tmp_path):
    with pytest.raises(config.ConfigError, match=r"method\.name: expected a string; got int 3"):
        load(tmp_path, "method: {name: 3}")


def test_method_quantizes():
    assert [m for m in Method if m.quantizes] == [Method.PTQ, Method.QAT]


def test_the_plan_holds_the_rules_of_quant(tmp_path):
    (cell,) = load(tmp_path, QUANT).cells()
    plan = cell.plan
    assert isinstance(plan, Plan) and plan.adaround is None
    w4 = qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
    a8 = qjax.QuantSpec(dtype="int8")
    assert [r.path for r in plan.rules] == ["fc1", "fc2", "head", ".*"]
    assert plan.rules[0].is_exclusion
    assert plan.rules[1].weights == qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
    assert plan.rules[1].activations == a8
    assert plan.rules[2].weights == w4 and plan.rules[2].activation_estimator is qjax.Estimator.PACT
    assert plan.default_rule is plan.rules[-1]
    assert plan.default_rule == qjax.nn.Rule(
        path=".*", weights=w4, activations=a8, weight_estimator="lsq", activation_estimator="ste"
    )


def test_each_spec_is_parsed_once_and_the_runner_reads_no_dict(tmp_path, monkeypatch):
    calls = []
    from_dict = qjax.QuantSpec.from_dict.__func__

    def counting(cls, d):
        calls.append(dict(d))
        return from_dict(cls, d)

    monkeypatch.setattr(qjax.QuantSpec, "from_dict", classmethod(counting))
    cells = load(tmp_path, QUANT).cells()
    # quant.weights, quant.activations and fc2's merged weights; fc1 and head reuse quant's specs
    assert len(calls) == 3
    del calls[:]
    assert run.check_layers(cells) == []  # quantizes the model with the plan's rules
    assert calls == []


def test_adaround_settings_are_built_into_the_plan(tmp_path):
    overrides = ["method.rounding=adaround", "method.adaround_iterations=7", "method.adaround_lr=0.01"]
    (cell,) = load(tmp_path, QUANT, overrides).cells()
    assert cell.plan.adaround == qjax.methods.AdaRoundConfig(iterations=7, samples=1024, lr=0.01)


def test_spec_problems_are_reported_under_the_field_the_error_names(tmp_path):
    cfg = config.from_dict(
        {
            "method": {"name": "ptq"},
            "quant": {
                "weights": {"dtype": "int4", "granularity": "per_group", "axis": 0},
                "activations": {"dtype": "int8", "block_shape": 4},
                "overrides": [{"path": "fc1", "weights": {"mse_grid": 1}}],
            },
        }
    )
    plan, problems = validation.make_plan(cfg)
    assert plan is None
    assert [p for p, _ in problems] == ["quant.weights.granularity", "quant.activations"]
    assert problems[0][1].startswith("granularity='per_group' needs group_size=")
    cfg = config.from_dict(
        {
            "method": {"name": "ptq"},
            "quant": {"weights": {"dtype": "int8"}, "overrides": [{"path": "x", "weights": {"mse_grid": 1}}]},
        }
    )
    _, problems = validation.make_plan(cfg)
    assert problems == [("quant.overrides[0].weights.mse_grid", "mse_grid=1 must be an int >= 2, e.g. 100")]


def test_a_valid_config_has_a_plan_and_no_problems():
    plan, problems = validation.make_plan(ExperimentConfig())
    assert problems == [] and [r.path for r in plan.rules] == [".*"] and plan.default_rule.is_exclusion


def test_grid_options_of_a_config_reach_the_plan_or_name_their_field():
    weights = {"dtype": "int4", "granularity": "per_channel", "axis": -1, "narrow_range": False}
    mx = {"dtype": "mxfp8", "granularity": "per_group", "axis": -1, "mx_scale_rounding": "ceil"}
    cfg = config.from_dict({"method": {"name": "ptq"}, "quant": {"weights": weights, "activations": mx}})
    plan, problems = validation.make_plan(cfg)
    assert problems == [] and plan is not None
    assert plan.default_rule.weights == qjax.QuantSpec(**weights)
    assert plan.default_rule.weights.format.qrange(True) == (-8, 7)
    assert plan.default_rule.activations.mx_scale_rounding is qjax.MXScaleRounding.CEIL
    bad = {"dtype": "uint4", "narrow_range": False}
    cfg = config.from_dict({"method": {"name": "ptq"}, "quant": {"weights": bad, "activations": None}})
    _, problems = validation.make_plan(cfg)
    assert [p for p, _ in problems] == ["quant.weights.narrow_range"]


ATTENTION = """
method: {name: ptq}
task: {name: digits, model: mlp}
quant:
  weights: {dtype: int8, granularity: per_tensor}
  activations: {dtype: int8, granularity: per_token}
  attention: {dtype: int8, granularity: per_token}
  activation_estimator: lsq
  overrides: [{path: fc1, keep_float: true}]
"""


def test_quant_attention_is_one_attention_rule_before_the_catch_all(tmp_path):
    (cell,) = load(tmp_path, ATTENTION).cells()
    rules = cell.plan.rules
    assert [(r.path, r.kind) for r in rules] == [("fc1", "layer"), (".*", "attention"), (".*", "layer")]
    assert cell.plan.attention_rules == (rules[1],) and cell.plan.default_rule is rules[-1]
    # lsq holds state the attention operands have none of: they take the plain straight-through
    assert rules[1] == qjax.nn.Rule(
        path=".*", kind="attention", activations=qjax.QuantSpec(dtype="int8", granularity="per_token")
    )
    cfg = cell.config
    assert config.from_dict(yaml.safe_load(config.dump_yaml(cfg))) == cfg
    without = load(tmp_path, ATTENTION.replace("  attention: {dtype: int8, granularity: per_token}\n", ""))
    assert without.cells()[0].plan.attention_rules == () and without.cells()[0].hash != cell.hash
    only = load(tmp_path, "method: {name: ptq}\nquant: {attention: {dtype: int8}}").cells()
    assert [r.kind for r in only[0].plan.rules] == ["attention", "layer"]  # attention alone is a PTQ


@pytest.mark.parametrize(
    ("attention", "path", "match"),
    [
        ({"dtype": "int8", "granularity": "per_channel", "axis": -1}, "quant.attention", "per_token"),
        (
            {"dtype": "int8", "granulrity": "per_token"},
            "quant.attention.granulrity",
            "did you mean 'granularity'",
        ),
        ({"dtype": "nvfp4", "granularity": "per_group", "axis": -1}, "quant.attention", "integer or fp8"),
        ({"dtype": "int8", "rounding": "stochastic"}, "quant.attention.rounding", "rounding_seed"),
    ],
)
def test_quant_attention_problems_name_the_field(attention, path, match):
    cfg = config.from_dict({"method": {"name": "ptq"}, "quant": {"attention": attention}})
    plan, problems = validation.make_plan(cfg)
    assert plan is None and [p for p, _ in problems] == [path], problems
    assert match in problems[0][1]


def test_quant_attention_on_a_model_without_attention_is_refused(tmp_path):
    cells = load(tmp_path, ATTENTION).cells()
    (problem,) = run.check_layers(cells)
    assert "quant.attention: model 'mlp' of task 'digits' has no attention layer" in problem


def test_the_smoothquant_paper_rows_quantize_weights_per_tensor_and_the_attention_matmuls():
    cells = config.load(ROOT / "configs" / "llm" / "smoothquant_paper.yaml").cells()
    kinds = {"paper": 0, "lenient": 0}
    for cell in cells:
        label = cell.axes["variant"]
        kind = label.rsplit(" ", 1)[-1]
        kinds[kind] += 1
        linears, attention = cell.plan.default_rule, cell.plan.attention_rules
        assert cell.config.method.smoothquant_alpha in (0.5, 0.85)
        if kind == "lenient":
            assert attention == () and linears.weights.granularity == "per_channel", label
            continue
        (att,) = attention
        assert linears.weights == qjax.QuantSpec(dtype="int8", granularity="per_tensor"), label
        assert att.activations.granularity == linears.activations.granularity, label  # O1 / O2, O3
        assert ("O1" in label) == (att.activations.granularity == "per_token"), label
        assert ("O3" in label) == (linears.activation_scale == "static"), label
    assert kinds == {"paper": 9, "lenient": 6}


def test_quant_gradients_and_amax_history_reach_every_quantizing_rule():
    cfg = config.from_dict(
        {
            "method": {"name": "qat"},
            "quant": {
                "weights": {"dtype": "float8_e4m3fn"},
                "activations": {"dtype": "float8_e4m3fn"},
                "gradients": {"dtype": "float8_e5m2", "rounding": "stochastic"},
                "amax_history": 8,
                "rounding_seed": 0,
                "overrides": [
                    {"path": "fc1", "keep_float": True},
                    {"path": "head", "gradients": {"dtype": "int8"}},
                ],
            },
        }
    )
    plan, problems = validation.make_plan(cfg)
    assert problems == []
    fc1, head, default = plan.rules
    assert fc1.is_exclusion and fc1.gradients is None
    assert head.gradients == qjax.nn.GradientSpec(dtype="int8")
    assert default.gradients == qjax.nn.GradientSpec(dtype="float8_e5m2", rounding="stochastic")
    assert head.amax_history == default.amax_history == 8


@pytest.mark.parametrize("recipe", qjax.nn.TRAINING_RECIPES)
def test_a_recipe_gives_the_rule_of_qjax_training_recipe(recipe):
    cfg = config.from_dict({"method": {"name": "qat"}, "quant": {"recipe": recipe, "recipe_block_size": 32}})
    plan, problems = validation.make_plan(cfg)
    assert problems == []
    expected = qjax.nn.training_recipe(recipe, block_size=32)
    (rule,) = plan.rules
    for field in ("weights", "activations", "gradients", "amax_history"):
        assert getattr(rule, field) == getattr(expected, field), field


def test_the_config_fields_win_over_the_recipe_key_by_key():
    cfg = config.from_dict(
        {
            "method": {"name": "qat"},
            "quant": {"recipe": "fp8_current", "gradients": {"rounding": "stochastic"}, "rounding_seed": 0},
        }
    )
    plan, _ = validation.make_plan(cfg)
    (rule,) = plan.rules
    assert rule.gradients == qjax.nn.GradientSpec(
        dtype="float8_e5m2", residual_dtype="float8_e4m3fn", rounding="stochastic"
    )
    assert rule.weights == qjax.QuantSpec(dtype="float8_e4m3fn") and rule.amax_history == 0


@pytest.mark.parametrize(
    "quant,method,path,match",
    [
        ({"recipe": "fp8_delay"}, {}, "quant.recipe", "did you mean 'fp8_delayed'"),
        (
            {"weights": {"dtype": "int8"}, "gradients": {"dtype": "uint8"}},
            {},
            "quant.gradients.dtype",
            "signed",
        ),
        (
            {"weights": {"dtype": "int8", "granularity": "per_channel", "axis": -1}, "amax_history": 4},
            {},
            "quant.amax_history",
            "per-tensor",
        ),
        ({"weights": {"dtype": "int8"}}, {"name": "ptq", "from_scratch": True}, "method.from_scratch", "qat"),
    ],
)
def test_training_problems_name_the_field(quant, method, path, match):
    cfg = config.from_dict({"method": {"name": "qat", **method}, "quant": quant})
    plan, problems = validation.make_plan(cfg)
    assert plan is None
    assert problems[0][0] == path, problems
    assert match in problems[0][1]
    assert len(problems) == 1 or path == "quant.recipe"  # an unknown recipe also leaves quant empty
