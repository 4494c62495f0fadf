"""Bad input caught before compute, with the key and the fix named: config values that used to
fail late or run something else (negative seeds, names that leave ``output_dir``, runs that never
end, empty or binary config files), an output directory that cannot be written, and lines of
``results.jsonl`` that are not records (``qjax-run`` and ``qjax-report`` name the file and line)."""

import pytest

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import report, run
from tests import ROOT

SMOKE = ROOT / "configs" / "digits" / "smoke.yaml"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["seed=-1"], r"seed: must be >= 0, got -1; seeds are non-negative"),
        (["name=../../escape"], r"name: '../../escape' must be one directory name under output_dir"),
        (["name=/tmp/abs"], r"name: '/tmp/abs' must be one directory name"),
        (["name=.."], r"name: '..' must be one directory name"),
        (["train.epochs=100000000000000000000000"], r"train.epochs: 1\d+ is more than 1,000,000 passes"),
        (["quant.weights.percentile=99.9"], r"quant.weights.percentile: 99.9 is ignored: no cell calibrates"),
        (
            ["quant.activations.mse_grid=20"],
            r"quant.activations.mse_grid: 20 is ignored: no cell calibrates with 'mse'",
        ),
        (["method.steps=10000000000"], r"method.steps: 10000000000 is more than 1,000,000,000 steps"),
    ],
)
def test_config_values_are_refused_with_the_key(overrides, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.load(SMOKE, overrides).cells()


def test_an_option_used_by_some_cells_of_a_sweep_is_fine():
    cells = config_lib.load(ROOT / "configs" / "study" / "calibration_weights.yaml").cells()
    assert {c.config.quant.weights["calibration"] for c in cells} == {"minmax", "percentile", "mse"}


def test_empty_and_binary_config_files_are_named(tmp_path):
    empty, binary = tmp_path / "empty.yaml", tmp_path / "binary.yaml"
    empty.write_text("")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(config_lib.ConfigError, match=r"the file is empty; a config needs at least task:"):
        config_lib.load(empty)
    with pytest.raises(config_lib.ConfigError, match=r"not a text \(UTF-8\) file"):
        config_lib.load(binary)


def test_the_writability_check_sees_the_folder_that_exists(tmp_path, monkeypatch):
    """``os.access`` (what the check asks) says no for the nearest folder that exists: the sweep is
    refused before anything is written (as root, permissions never say no, so the test decides)."""
    calls = []

    def no_access(path, mode):
        calls.append(path)
        return False

    monkeypatch.setattr(run.os, "access", no_access)
    with pytest.raises(config_lib.ConfigError, match=rf"output_dir: {tmp_path} is not writable"):
        run.check_writable(tmp_path / "new" / "sweep")
    assert calls == [tmp_path]


BAD_LINES = {
    "garbage": b"this is not json\n",
    "truncated": b'{"cell": "method.name=ptq", "status": "o\n',
    "a number": b"42\n",
    "no cell": b'{"status": "ok"}\n',
    "not utf-8": b'{"cell": "\xff\xfe"}\n',
}


@pytest.mark.parametrize("bad", sorted(BAD_LINES))
def test_a_bad_results_line_is_named_by_run_and_report(tmp_path, capsys, bad):
    sweep_dir = tmp_path / "digits_smoke"
    sweep_dir.mkdir()
    good = records.to_json({"cell": "method.name=qat", "status": "failed", "hash": "x"}).encode() + b"\n"
    (sweep_dir / records.RESULTS).write_bytes(good + BAD_LINES[bad])
    before = (sweep_dir / records.RESULTS).read_bytes()
    with pytest.raises(records.ResultsError, match=rf"{records.RESULTS}:2: .*fix or delete that line"):
        records.read_results(sweep_dir)
    assert run.main([str(SMOKE), f"output_dir={tmp_path}"]) == 2
    assert f"{records.RESULTS}:2:" in capsys.readouterr().err
    with pytest.raises(report.ReportError, match=rf"{records.RESULTS}:2:"):
        report.load_results(sweep_dir)
    assert (sweep_dir / records.RESULTS).read_bytes() == before  # nothing rewritten away


def test_dry_run_checks_the_llm_model_path(capsys):
    config = ROOT / "configs" / "llm" / "rtn.yaml"
    assert run.main([str(config), "task.data_dir=/nonexistent/model.gguf", "--dry-run"]) == 2
    assert "task.data_dir='/nonexistent/model.gguf' is neither a GGUF file" in capsys.readouterr().err
