"""Experiment configs: base includes, overrides, validation messages, grid expansion, hashes."""

import dataclasses
import hashlib
import json
import re
import textwrap

import pytest
import yaml

from experiments.sweep import config
from experiments.sweep.schema import ExperimentConfig, LayerOverride

PTQ = "method: {name: ptq}\nquant: {weights: {dtype: int8}, activations: {dtype: int8}}\n"


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def dedent(text):
    return textwrap.dedent(text).lstrip("\n")


def load(tmp_path, text, overrides=()):
    return config.load(write(tmp_path, text), overrides)


def problems(tmp_path, text, overrides=()):
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, text, overrides)
    return info.value


# ----------------------------------------------------------------------------- one error of each kind


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {epoch: 3}", r"config: train\.epoch: unknown key; did you mean 'train\.epochs'\?"),
        ("epochs: 3", r"epochs: unknown key here; did you mean 'train\.epochs' or 'method\.epochs'\?"),
        (
            "quant: {overrides: [{path: fc1, weight_estimatr: lsq}]}",
            r"quant\.overrides\[0\]\.weight_estimatr: "
            r"unknown key; did you mean 'quant\.overrides\[0\]\.weight_estimator'\?",
        ),
        ("trian: {epochs: 3}", r"trian: unknown key; did you mean 'train'\?"),
        (
            "quant: {overrides: [{weights: {dtype: int8}}]}",
            r"quant\.overrides\[0\]\.path: required key missing",
        ),
    ],
)
def test_unknown_and_missing_keys(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message):
        load(tmp_path, text)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {epochs: three}", r"train\.epochs: expected an integer; got str 'three'"),
        ("train: {epochs: true}", r"train\.epochs: expected an integer; got bool True"),
        ("train: {epochs: 2.0}", r"train\.epochs: expected an integer; got float 2\.0"),
        ("train: {learning_rate: fast}", r"train\.learning_rate: expected a number; got str 'fast'"),
        ("method: {fold_batchnorm: 1}", r"method\.fold_batchnorm: expected true or false; got int 1"),
        ("task: {name: null}", r"task\.name: must not be null; expected a string"),
        ("task: {model_args: [1]}", r"task\.model_args: expected a mapping with string keys"),
        ("quant: {overrides: {path: fc1}}", r"quant\.overrides: expected a list; got dict"),
        ("train: 3", r"train: expected a mapping of TrainConfig fields; got int 3"),
    ],
)
def test_wrong_types(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message):
        load(tmp_path, text)


def test_accepted_types(tmp_path):
    """An int is a fine float (stored as float); a list is a tuple; null where the schema allows it."""
    text = """
        train: {learning_rate: 1, weight_decay: 0}
        task: {data_dir: null, model_args: {hidden: 32}}
        quant: {overrides: [{path: fc1, keep_float: true}]}
    """
    cfg = load(tmp_path, text).base
    assert cfg.train.learning_rate == 1.0 and type(cfg.train.learning_rate) is float
    assert type(cfg.train.weight_decay) is float
    assert cfg.quant.overrides == (LayerOverride(path="fc1", keep_float=True),)
    assert cfg.task.model_args == {"hidden": 32}


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {epochs: 0}", r"train\.epochs: must be >= 1, got 0; or set train\.steps > 0"),
        ("train: {steps: -1}", r"train\.steps: must be >= 0, got -1"),
        ("train: {batch_size: 0}", r"train\.batch_size: must be >= 1, got 0"),
        ("calibration: {batch_size: 0}", r"calibration\.batch_size: must be >= 1, got 0"),
        ("eval: {batch_size: -5}", r"eval\.batch_size: must be >= 1, got -5"),
        ("train: {learning_rate: 0}", r"train\.learning_rate: must be > 0, got 0\.0"),
        ("method: {learning_rate: -1e-4}", r"method\.learning_rate: must be > 0, got -0\.0001"),
        (
            "method: {name: qta}",
            r"method\.name: 'qta' is not one of float, ptq, qat, finetune, llm_int8; did you mean 'qat'\?",
        ),
        (
            "train: {optimizer: adma}",
            r"train\.optimizer: 'adma' is not one of adam, adamw, sgd; did you mean 'adam'",
        ),
        (
            "method: {schedule: cosin}",
            r"method\.schedule: 'cosin' is not one of constant, cosine, warmup_cosine",
        ),
        ("train: {weight_decay: 0.1}", r"train\.weight_decay: only optimizer 'adamw' uses it"),
        ("train: {warmup_steps: 10}", r"train\.warmup_steps: only schedule 'warmup_cosine' uses it"),
        (
            "quant: {weight_estimator: pact}",
            r"quant\.weight_estimator: 'pact' is not one of ste, clipped_ste, lsq",
        ),
        (
            "quant: {activation_estimator: lsqq}",
            r"quant\.activation_estimator: 'lsqq' is not one of .*did you mean 'lsq'",
        ),
        (
            "quant: {activation_scale: statc}",
            r"quant\.activation_scale: 'statc' is not one of dynamic, static",
        ),
        (
            "quant: {observer: hist}",
            r"quant\.observer: 'hist' is not one of minmax, moving_average, histogram",
        ),
        ("report: {plot: pie}", r"report\.plot: 'pie' is not one of auto, line, point, bar"),
        (
            "eval: {serve: true, kernels: triton}",
            r"eval\.kernels: 'triton' is not one of auto, pallas, xla, reference, mosaic_gpu",
        ),
        ("eval: {kernels: reference}", r"eval\.kernels: only the converted model uses it"),
        ("report: {rows: bitz}", r"report\.rows: 'bitz' is neither a sweep axis nor a config key"),
        ("method: {name: ptq, rotation: hadamard}", r"method\.rotation: runs on the llm task's models"),
        ("method: {rotation: hadamrd}", r"method\.rotation: 'hadamrd' is not one of hadamard"),
        ("method: {rotation_qk: true}", r"method\.rotation_qk: rotates with method\.rotation: set it"),
        (
            "method: {rotation: hadamard, smoothquant_alpha: 0.5, smoothquant_pairs: true}",
            r"method\.smoothquant_pairs: folds into up_proj, but method\.rotation_online_down",
        ),
        ("task: {name: digit}", r"task\.name: 'digit' is not one of .*did you mean 'digits'\?"),
    ],
)
def test_impossible_values(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message):
        load(tmp_path, text)


@pytest.mark.parametrize(
    "quant, message",
    [
        ("{weights: {dtype: int9}}", r"quant\.weights\.dtype: dtype='int9' is not a known format"),
        (
            "{weights: {dtyp: int4}}",
            r"quant\.weights\.dtyp: unknown QuantSpec field 'dtyp'; did you mean 'dtype'",
        ),
        (
            "{activations: {dtype: int8, granularity: per_channel}}",
            r"quant\.activations\.granularity: granularity='per_channel' needs axis=",
        ),
        (
            "{weights: {dtype: int4, rounding: stochastic}}",
            r"quant\.weights\.rounding: rounding='stochastic' needs a key: set quant\.rounding_seed",
        ),
        (
            "{weights: {dtype: int8}, overrides: [{path: fc1, weights: {dtype: mxfp4}}]}",
            r"quant\.overrides\[0\]\.weights\.dtype: dtype='mxfp4' shares one scale per 32 elements",
        ),
        (
            "{weights: {dtype: int8}, overrides: [{path: 'fc(1', weights: {dtype: int4}}]}",
            r"quant\.overrides\[0\]\.path: 'fc\(1' is not a regular expression",
        ),
        (
            "{weights: {dtype: int8}, overrides: [{path: fc1, keep_float: true, weights: {dtype: int4}}]}",
            r"quant\.overrides\[0\]: keep_float: true keeps the layers in float; remove its other fields",
        ),
        (
            "{activations: {dtype: int8, granularity: per_token}, activation_scale: static}",
            r"quant: Rule '\.\*': static activation scales are per-tensor",
        ),
    ],
)
def test_quant_specs(tmp_path, quant, message):
    with pytest.raises(config.ConfigError, match=message):
        load(tmp_path, f"method: {{name: ptq}}\nquant: {quant}\n")


def test_stochastic_rounding_with_a_seed_is_valid(tmp_path):
    cfg = load(
        tmp_path,
        "method: {name: ptq}\nquant: {weights: {dtype: int4, rounding: stochastic}, rounding_seed: 3}",
    )
    assert cfg.base.quant.rounding_seed == 3


def test_ptq_and_qat_need_something_to_quantize(tmp_path):
    err = problems(tmp_path, "sweep: {method.name: [float, ptq, qat]}")
    needs = "needs quant.weights, quant.activations or quant.attention; e.g. weights: {dtype: int8}"
    assert [str(p) for p in err.problems] == [
        f"method.name=ptq: quant: method.name='ptq' {needs}",
        f"method.name=qat: quant: method.name='qat' {needs}",
    ]


# ----------------------------------------------------------------------------- the whole grid at once


def test_every_bad_cell_is_reported(tmp_path):
    text = """
        train: {epochs: 2, optimizer: adma}
        sweep:
          seed: [0, 1]
          train.epochs: [0, 1, -1]
    """
    err = problems(tmp_path, text)
    assert len(err.problems) == 3
    assert str(err).splitlines()[0].endswith("3 config problems")
    assert "train.epochs=0 (2 cells): train.epochs: must be >= 1, got 0" in str(err)
    assert "train.epochs=-1 (2 cells): train.epochs: must be >= 1, got -1" in str(err)
    assert "all 6 cells: train.optimizer: 'adma' is not one of" in str(err)


def test_problem_location_names_the_axis_value(tmp_path):
    """A problem in some cells is located by the fewest axis values that select exactly them."""
    text = PTQ + dedent("""
        sweep:
          seed: [0, 1, 2]
          bits:
            W8A8: {quant.weights.dtype: int8}
            W9A8: {quant.weights.dtype: int9}
          method.name: [ptq, qat]
    """)
    err = problems(tmp_path, text)
    assert [(p.where, p.path) for p in err.problems] == [("bits=W9A8 (6 cells)", "quant.weights.dtype")]
    assert str(err).endswith("bits=W9A8 (6 cells): quant.weights.dtype: " + err.problems[0].message)
    assert err.problems[0].message.startswith("dtype='int9' is not a known format")


def test_scattered_failures_list_their_labels(tmp_path):
    text = """
        sweep:
          train.epochs: [0, 1]
          train.steps: [0, 5]
    """  # only epochs=0 with steps=0 fails
    err = problems(tmp_path, text)
    assert [p.where for p in err.problems] == ["train.epochs=0,train.steps=0"]


def test_model_must_belong_to_the_task(tmp_path):
    err = problems(tmp_path, "task: {model: cnn}\nsweep: {task.name: [digits, tiny_lm]}")
    assert [str(p) for p in err.problems] == [
        "task.name=tiny_lm: task.model: 'cnn' is not one of transformer"
    ]


def test_sweep_block_errors(tmp_path):
    text = """
        sweep:
          seed: 3
          train.epoch: [1, 2]
          method: {a: {method.name: ptq}}
          bits: {W4: {quant.weights.dtype: int4}, W8: int8}
          empty: []
    """
    err = problems(tmp_path, text)
    got = {p.path: p.message for p in err.problems}
    assert got["sweep.seed"].startswith("an axis is a non-empty list of values")
    assert got["sweep.train.epoch"].startswith("unknown key; did you mean 'train.epochs'?")
    assert got["sweep.method"].startswith("method is a config key: its axis is a list of values")
    assert got["sweep.bits.W8"].startswith("a named axis label maps dotted config keys to values")
    assert got["sweep.empty"].startswith("an axis is a non-empty list")
    assert all(p.where == "sweep" for p in err.problems)


def test_two_axes_may_not_set_the_same_key(tmp_path):
    text = PTQ + dedent("""
        sweep:
          quant.weights.dtype: [int4, int8]
          bits: {W4A8: {quant.weights.dtype: int4, quant.activations.dtype: int8}}
    """)
    with pytest.raises(
        config.ConfigError,
        match=r"sweep\.bits: sets quant\.weights\.dtype, which axis "
        r"'quant\.weights\.dtype' also sets",
    ):
        load(tmp_path, text)


def test_duplicate_cells_are_refused(tmp_path):
    with pytest.raises(
        config.ConfigError, match=r"train\.epochs=1: sweep: same resolved config as cell train\.epochs=1"
    ):
        load(tmp_path, "sweep: {train.epochs: [1, 2, 1]}")


# ----------------------------------------------------------------------------- base files and overrides


def test_base_files_merge_deeply_later_wins(tmp_path):
    write(
        tmp_path,
        "train: {epochs: 5, batch_size: 64}\nquant: {weights: {dtype: int8, granularity: per_channel, "
        "axis: -1}}\ntask: {model_args: {hidden: 8}}\nsweep: {seed: [0, 1], method.name: [ptq, qat]}\n",
        "common/a.yaml",
    )
    write(tmp_path, "base: a.yaml\ntrain: {epochs: 7}\nname: from_b\n", "common/b.yaml")
    text = """
        base: [common/b.yaml, common/extra.yaml]
        train: {learning_rate: 0.01}
        quant: {weights: {dtype: int4}}
        sweep: {seed: [3], method.name: null}
    """
    write(tmp_path, "train: {batch_size: 32}\n", "common/extra.yaml")
    spec = load(tmp_path, text)
    cfg = spec.base
    assert (cfg.name, cfg.train.epochs, cfg.train.batch_size, cfg.train.learning_rate) == (
        "from_b",
        7,
        32,
        0.01,
    )
    assert cfg.quant.weights == {"dtype": "int4", "granularity": "per_channel", "axis": -1}
    assert cfg.task.model_args == {"hidden": 8}
    assert [c.label for c in spec.cells()] == ["seed=3"]  # axis replaced whole; null removes one


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: [c.yaml]\n", "b.yaml")
    write(tmp_path, "base: a.yaml\n", "c.yaml")
    with pytest.raises(
        config.ConfigError, match=r"base include cycle a\.yaml -> b\.yaml -> c\.yaml -> a\.yaml"
    ):
        config.load(tmp_path / "a.yaml")
    write(tmp_path, "base: nowhere.yaml\n", "d.yaml")
    with pytest.raises(config.ConfigError, match=r"nowhere\.yaml: no such config file \(base of .*d\.yaml\)"):
        config.load(tmp_path / "d.yaml")
    write(tmp_path, "- 1\n- 2\n", "e.yaml")
    with pytest.raises(config.ConfigError, match="a config is a mapping of keys to values; got list"):
        config.load(tmp_path / "e.yaml")


def test_overrides(tmp_path):
    text = PTQ + "sweep: {seed: [0], method.name: [ptq, qat]}\n"
    spec = load(
        tmp_path,
        text,
        [
            "sweep.seed=[0,1,2]",
            "train.epochs=3",
            "train.learning_rate=1e-3",
            "quant.activations=null",
            "task.model_args.hidden=16",
        ],
    )
    assert [c.label for c in spec.cells()][:3] == [
        "seed=0,method.name=ptq",
        "seed=0,method.name=qat",
        "seed=1,method.name=ptq",
    ]
    assert len(spec.cells()) == 6
    cfg = spec.cells()[0].config
    assert (cfg.train.epochs, cfg.train.learning_rate, cfg.quant.activations) == (3, 0.001, None)
    assert cfg.task.model_args == {"hidden": 16}
    assert [c.label for c in load(tmp_path, text, ["sweep.method.name=null"]).cells()] == ["seed=0"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", r"all 2 cells: train\.epoch: unknown key; did you mean 'train\.epochs'\?"),
        ("train.epochs", r"command line: train\.epochs: expected dotted\.key=value"),
        (
            "train.epochs.x=3",
            r"command line: train\.epochs\.x: cannot set train\.epochs\.x: train\.epochs is 1",
        ),
        (
            "method.name=float",
            r"command line: method\.name: sweep axis 'method\.name' sets method\.name in every "
            r"cell; override the axis instead",
        ),
        ("base=x.yaml", r"command line: base: base files cannot be overridden"),
        ("train.epochs=[1", r"command line: train\.epochs: value '\[1' is not valid YAML"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(config.ConfigError, match=message):
        load(tmp_path, "train: {epochs: 1}\nsweep: {method.name: [ptq, qat]}\n" + PTQ, [override])


def test_yaml_reads_exponents_as_floats(tmp_path):
    assert (
        load(
            tmp_path, "train: {learning_rate: 2e-3}\nmethod: {learning_rate: 5.0e-5}"
        ).base.train.learning_rate
        == 0.002
    )


# ----------------------------------------------------------------------------- grid, labels, hashes


SWEEP = dedent("""
    sweep:
      seed: [0, 1]
      method.name: [ptq, qat]
      bits:
        W8A8: {quant.weights.dtype: int8, quant.activations.dtype: int8}
        W4A8: {quant.weights.dtype: int4, quant.activations.dtype: int8}
        W4A16: {quant.weights.dtype: int4, quant.activations: null}
""")
GRID = PTQ + SWEEP


def test_grid_expansion_order_and_contents(tmp_path):
    spec = load(tmp_path, GRID)
    cells = spec.cells()
    expected = [
        (seed, method, bits)
        for seed in (0, 1)
        for method in ("ptq", "qat")
        for bits in ("W8A8", "W4A8", "W4A16")
    ]
    assert [c.label for c in cells] == [f"seed={s},method.name={m},bits={b}" for s, m, b in expected]
    assert [c.axes for c in cells] == [{"seed": s, "method.name": m, "bits": b} for s, m, b in expected]
    weights = {"W8A8": "int8", "W4A8": "int4", "W4A16": "int4"}
    for cell, (seed, method, bits) in zip(cells, expected, strict=True):
        c = cell.config
        assert (c.seed, c.method.name, c.quant.weights) == (seed, method, {"dtype": weights[bits]})
        assert c.quant.activations == (None if bits == "W4A16" else {"dtype": "int8"})
    assert [a.name for a in spec.axes] == ["seed", "method.name", "bits"]
    assert [a.named for a in spec.axes] == [False, False, True]
    assert spec.base.seed == 0 and spec.base.quant.weights == {"dtype": "int8"}


def test_slugs_are_short_safe_and_unique(tmp_path):
    cells = load(tmp_path, GRID).cells()
    slugs = [c.slug for c in cells]
    assert len(set(slugs)) == len(slugs)
    assert all(
        re.fullmatch(r"[A-Za-z0-9._+-]{1,60}", s) and s.endswith("-" + c.hash[:8])
        for s, c in zip(slugs, cells, strict=True)
    )
    assert slugs[0] == f"seed0_ptq_W8A8-{cells[0].hash[:8]}"
    single = load(tmp_path, "name: solo").cells()
    assert [(c.label, c.axes) for c in single] == [("base", {})] and single[0].slug.startswith("cell-")


def canonical_sha256(cfg):
    d = dataclasses.asdict(cfg)
    del d["output_dir"], d["report"], d["mesh"], d["resources"], d["tracking"]
    if not d["plugins"]:
        del d["plugins"]  # hashed only when listed, so hashes from before the key stay
    if d["quant"]["attention"] is None:
        del d["quant"]["attention"]  # likewise: hashed only when set
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_hash_is_sha256_of_canonical_json(tmp_path):
    for cell in load(tmp_path, GRID).cells():
        assert cell.hash == canonical_sha256(cell.config) == config.config_hash(cell.config)


def test_hash_stability_and_sensitivity(tmp_path):
    a = (
        load(
            tmp_path,
            "train: {epochs: 2, learning_rate: 1}\nseed: 4",
        )
        .cells()[0]
        .hash
    )
    same = [
        "seed: 4\ntrain: {learning_rate: 1.0, epochs: 2}",  # key order, int for float
        "train: {epochs: 2, learning_rate: 1}\nseed: 4\noutput_dir: elsewhere",  # the sweep moved
        "train: {epochs: 2, learning_rate: 1}\nseed: 4\nreport: {plot: line}",  # only the report changed
    ]
    for text in same:
        assert load(tmp_path, text).cells()[0].hash == a, text
    different = [
        "train: {epochs: 2, learning_rate: 0.5}\nseed: 4",
        "train: {epochs: 2, learning_rate: 1}\nseed: 5",
        "train: {epochs: 2, learning_rate: 1}\nseed: 4\ntask: {model_args: {hidden: 8}}",
    ]
    hashes = {load(tmp_path, text).cells()[0].hash for text in different}
    assert len(hashes) == 3 and a not in hashes


def test_round_trip(tmp_path):
    text = SWEEP + dedent("""
    method: {name: ptq}
    quant:
      weights: {dtype: int8}
      activations: {dtype: int8}
      overrides:
        - {path: fc1, keep_float: true}
        - path: "fc[23]"
          weights: {dtype: int4, granularity: per_channel, axis: [-1]}
          activation_estimator: pact
    task: {model_args: {hidden: 32}}
    """)
    for cell in load(tmp_path, text).cells():
        cfg = cell.config
        d = config.to_dict(cfg)
        json.dumps(d)  # plain values only
        assert isinstance(d["quant"]["overrides"], list)
        assert config.from_dict(d) == cfg
        again = config.from_dict(yaml.safe_load(config.dump_yaml(cfg)))
        assert again == cfg and isinstance(again.quant.overrides[1], LayerOverride)
        assert config.config_hash(again) == cell.hash
    assert config.from_dict({}) == ExperimentConfig()
    with pytest.raises(config.ConfigError, match=r"config: train\.epoch: unknown key"):
        config.from_dict({"train": {"epoch": 1}})


def test_get_path(tmp_path):
    d = config.to_dict(load(tmp_path, GRID).cells()[1].config)
    assert config.get_path(d, "method.name") == "ptq"
    assert config.get_path(d, "quant.weights.dtype") == "int4"
    assert config.get_path(d, "quant.weights.group_size", None) is None
    with pytest.raises(KeyError, match=r"'train\.epoch': no key 'epoch'"):
        config.get_path(d, "train.epoch")


def test_listing_and_sweep_yaml(tmp_path):
    spec = load(tmp_path, "name: demo\n" + GRID, ["sweep.seed=[7]"])
    lines = spec.listing().splitlines()
    assert lines[0] == "demo: 6 cells = seed (1) x method.name (2) x bits (3)"
    assert len(lines) == 7
    for i, (line, cell) in enumerate(zip(lines[1:], spec.cells(), strict=True), 1):
        assert line.split() == [str(i), cell.label, cell.slug]
    raw = yaml.safe_load(spec.dump_yaml())
    assert raw["sweep"]["seed"] == [7] and "base" not in raw
    assert config.expand(raw).cells() == spec.cells()  # the written sweep reproduces the grid


def test_report_baseline_must_be_a_column_label(tmp_path):
    text = (
        PTQ
        + "sweep: {method.name: [ptq, qat]}\nreport: {rows: seed, columns: method.name, baseline: float}\n"
    )
    with pytest.raises(
        config.ConfigError, match=r"report\.baseline: 'float' is not a label of the column axis"
    ):
        load(tmp_path, text)
    ok = load(tmp_path, text.replace("baseline: float", "baseline: ptq"))
    assert ok.base.report.baseline == "ptq"


def test_report_keys_as_lists_or_comma_separated_and_pool_axes(tmp_path):
    sweep = "sweep: {seed: [0, 1], method.name: [ptq, qat], quant.rounding_seed: [0, 1]}\n"
    text = (
        PTQ
        + sweep
        + "report: {rows: 'method.name, quant.weights.dtype', columns: [seed], pool: quant.rounding_seed}\n"
    )
    report = load(tmp_path, text).base.report
    assert report.rows == ("method.name", "quant.weights.dtype") and report.columns == ("seed",)
    assert report.pool == ("quant.rounding_seed",)
    bad = PTQ + sweep + "report: {rows: 'method.name,', columns: [], pool: [seed, quant.weights.dtype]}\n"
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, bad)
    message = str(info.value)
    assert "report.columns: names no key; give at least one" in message
    axes = "seed, method.name, quant.rounding_seed"
    assert f"report.pool: 'quant.weights.dtype' is not a sweep axis; pool one of {axes}" in message
    assert "report.rows" not in message  # the trailing comma is no key
    clash = PTQ + sweep + "report: {rows: method.name, columns: seed, pool: [seed]}\n"
    with pytest.raises(config.ConfigError, match=r"report\.pool: 'seed' is a row or column key"):
        load(tmp_path, clash)
