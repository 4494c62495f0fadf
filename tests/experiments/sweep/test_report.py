"""experiments.sweep.report on a synthetic results.jsonl: numbers against numpy, files, order,
atomic writes."""

from __future__ import annotations

import csv
import itertools
import json
import os
import pathlib
import re

import numpy as np
import pytest

from experiments.sweep import report

SEEDS = (0, 1, 2)
BITS = ("W8A8", "W4A8", "W2A8")  # grid order, not alphabetical
METHODS = ("ptq", "qat")
FAILED = {(1, "ptq", "W2A8"), (2, "ptq", "W2A8"), (2, "qat", "W2A8")}
LAYERS = ("conv1", "head")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(seed, method, bits, rng):
    label = f"seed={seed},method.name={method},bits={bits}"
    config = {
        "name": "ptq_vs_qat",
        "seed": seed,
        "method": {"name": method},
        "quant": {"weights": {"dtype": "int" + bits[1]}},
        "report": {
            "rows": "bits",
            "columns": "method.name",
            "metric": "accuracy",
            "plot": "line",
            "title": None,
        },
    }
    record = {"cell": label, "axes": {"seed": seed, "method.name": method, "bits": bits}, "config": config}
    if (seed, method, bits) in FAILED:
        # metrics a failed cell must never contribute
        return record | {
            "status": "failed",
            "error": f"ValueError: boom {seed}\ntraceback",
            "metrics": {"accuracy": 99.0},
        }
    return record | {
        "status": "ok",
        "error": None,
        "metrics": {"accuracy": float(rng.uniform(0.5, 0.99)), "loss": float(rng.uniform(0.1, 2.0))},
        "model": {"size_bytes": int(rng.integers(1000, 9000)), "bits_per_weight": 4.5},
        "layers": [
            {
                "path": p,
                "weight_sqnr_db": float(rng.normal(30, 3)),
                "output_sqnr_db": float(rng.normal(20, 3)),
            }
            for p in LAYERS
        ],
        "protocol": {
            "git_commit": "abc123",
            "qjax": "0.1.0",
            "jax": "0.10.2",
            "device": "cpu: cpu x1",
            "dataset_sha256": "f00d",
            "seed": seed,
            "wall_time_s": 1.5,
        },
    }


def _records():
    rng = np.random.default_rng(0)
    return [_record(s, m, b, rng) for s, m, b in itertools.product(SEEDS, METHODS, BITS)]


def _write(tmp_path: pathlib.Path, records) -> pathlib.Path:
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def _values(records, method, bits, metric="accuracy"):
    return np.array(
        [
            r["metrics"][metric]
            for r in records
            if r["status"] == "ok" and r["axes"]["method.name"] == method and r["axes"]["bits"] == bits
        ]
    )


def _table(md: str) -> dict[str, dict[str, str]]:
    """The first markdown table of ``md`` as {row label: {column label: cell text}}."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        out[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    records = _records()
    sweep = _write(tmp_path_factory.mktemp("sweep"), records)
    paths = report.render(sweep)
    return records, sweep, paths


def test_table_matches_numpy(rendered):
    records, sweep, _ = rendered
    md = (sweep / "results.md").read_text()
    table = _table(md)
    assert list(table) == list(BITS)  # first-appearance order, not sorted as strings
    for bits, method in itertools.product(BITS, METHODS):
        values = _values(records, method, bits)
        text = table[bits][method]
        numbers = [float(x) for x in re.findall(r"[-\d.]+(?=\s|$| \()", text.split("(n=")[0])]
        mean_text = text.split(" ")[0]
        decimals = len(mean_text.partition(".")[2])
        assert numbers[0] == pytest.approx(values.mean(), abs=0.5 * 10**-decimals + 1e-12)
        if len(values) > 1:
            assert numbers[1] == pytest.approx(values.std(ddof=1), abs=0.5 * 10**-decimals + 1e-12)
            assert "±" in text
        else:
            assert "±" not in text
        assert (f"(n={len(values)})" in text) == (len(values) < len(SEEDS))
    assert "`accuracy`, mean ± sample std over seed" in md


def test_failed_cells_are_listed_not_averaged(rendered):
    _, sweep, _ = rendered
    md = (sweep / "results.md").read_text()
    failed_section = md.split("## Failed cells (3)")[1].split("## Protocol")[0]
    for seed, method, bits in FAILED:
        line = f"- `seed={seed},method.name={method},bits={bits}` (bits={bits}, method.name={method}): "
        assert line + f"ValueError: boom {seed}" in failed_section
    assert "traceback" not in failed_section  # first line of the error only
    assert float(_table(md)["W2A8"]["ptq"].split()[0]) < 1.0  # the 99.0 of the failed seeds is not in


def test_protocol_summary(rendered):
    _, sweep, _ = rendered
    md = (sweep / "results.md").read_text()
    protocol = md.split("## Protocol")[1]
    assert f"- rendered with: `qjax-report {sweep}`" in protocol
    for line in ("- qjax: `0.1.0`", "- jax: `0.10.2`", "- git_commit: `abc123`", "- device: `cpu: cpu x1`"):
        assert line in protocol
    assert "- dataset_sha256: `f00d`" in protocol
    assert f"- wall_time_s: {1.5 * 15:.1f} in total over 15 cells" in protocol
    assert "- seed:" not in protocol  # per-cell values are the table's business
    # the command line comes first, then the versions in a fixed order
    assert protocol.index("qjax:") < protocol.index("jax:") < protocol.index("git_commit")


def test_csv_long_form(rendered):
    records, sweep, _ = rendered
    with open(sweep / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["row"], r["column"]) for r in rows] == list(itertools.product(BITS, METHODS))
    for r in rows:
        values = _values(records, r["column"], r["row"])
        assert int(r["n"]) == len(values)
        assert float(r["mean"]) == pytest.approx(values.mean(), rel=1e-14)
        if len(values) > 1:
            assert float(r["std"]) == pytest.approx(values.std(ddof=1), rel=1e-12)
        else:
            assert r["std"] == ""


def test_png_is_a_valid_png(rendered):
    import matplotlib.image

    _, sweep, paths = rendered
    data = paths["results.png"].read_bytes()
    assert data.startswith(PNG_MAGIC)
    image = matplotlib.image.imread(paths["results.png"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # something is drawn
    assert set(paths) == {"results.md", "results.csv", "results.png", "layers.md"}
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]


def test_layers_table_is_the_mean_over_seeds(rendered):
    records, sweep, _ = rendered
    md = (sweep / "layers.md").read_text()
    sections = md.split("## bits = ")[1:]
    assert [s.splitlines()[0] for s in sections] == list(BITS)
    for section, bits in zip(sections, BITS, strict=True):
        table = _table(section)
        assert list(table) == list(LAYERS)
        for method, layer in itertools.product(METHODS, LAYERS):
            ok = [r for r in records if r["status"] == "ok" and r["axes"]["bits"] == bits]
            ok = [r for r in ok if r["axes"]["method.name"] == method]
            rows = [x for r in ok for x in r["layers"] if x["path"] == layer]
            w, o = (float(x) for x in table[layer][method].split(" / "))
            assert w == pytest.approx(np.mean([x["weight_sqnr_db"] for x in rows]), abs=0.051)
            assert o == pytest.approx(np.mean([x["output_sqnr_db"] for x in rows]), abs=0.051)


def test_numeric_rows_sort_numerically_and_overrides(tmp_path):
    records = []
    for seed, bits in itertools.product((0, 1), (8, 2, 16, 4)):
        r = _record(seed, "ptq", "W8A8", np.random.default_rng(seed * 100 + bits))
        r["axes"] = {"seed": seed, "quant.weights.bits": bits}
        r["cell"] = f"seed={seed},bits={bits}"
        records.append(r)
    sweep = _write(tmp_path, records)
    report.render(
        sweep, rows="quant.weights.bits", columns="method.name", metric="model.size_bytes", plot="bar"
    )
    table = _table((sweep / "results.md").read_text())
    assert list(table) == ["2", "4", "8", "16"]
    for bits in (2, 4, 8, 16):
        sizes = [r["model"]["size_bytes"] for r in records if r["axes"]["quant.weights.bits"] == bits]
        mean, std = (float(x) for x in table[str(bits)]["ptq"].split(" ± "))
        assert mean == pytest.approx(np.mean(sizes), abs=0.5)
        assert std == pytest.approx(np.std(sizes, ddof=1), abs=0.5)
    assert (sweep / "results.png").read_bytes().startswith(PNG_MAGIC)
    report.render(sweep, rows="quant.weights.bits", plot="line")  # numeric x axis
    assert (sweep / "results.png").read_bytes().startswith(PNG_MAGIC)
    assert report.ordered(["16", "4", "8"]) == ["4", "8", "16"]
    assert report.ordered(["W8A8", "W4A8", "W8A8", "W2A8"]) == ["W8A8", "W4A8", "W2A8"]
    assert report.ordered([0.5, 0.25, 1.0]) == ["0.25", "0.5", "1"]
    assert report.ordered([True, False]) == ["true", "false"]  # bools are labels, not numbers


def test_lookup_prefers_axes_then_dotted_config():
    record = {
        "cell": "c",
        "axes": {"bits": "W4A8", "method.name": "qat"},
        "config": {"method": {"name": "ptq"}},
    }
    assert report.lookup(record, "bits") == "W4A8"
    assert report.lookup(record, "method.name") == "qat"
    assert report.lookup({**record, "axes": {}}, "method.name") == "ptq"
    with pytest.raises(
        report.ReportError, match=r"'method.nme' is neither an axis of the sweep \(bits, method.name\)"
    ):
        report.lookup(record, "method.nme")
    with pytest.raises(report.ReportError, match="metric 'acc' is not in the record of cell 'c'"):
        report.metric_value({**record, "metrics": {"accuracy": 1.0}}, "acc")
    assert report.metric_value({"metrics": {"loss": 2}}, "loss") == 2.0


def test_sweep_yaml_report_block_and_retried_cells(tmp_path):
    records = _records()
    retried = dict(records[-1], status="ok", error=None, metrics={"accuracy": 0.5, "loss": 1.0})
    retried["cell"] = "seed=2,method.name=qat,bits=W2A8"  # the failed cell, run again
    sweep = _write(tmp_path, [*records, retried])
    (sweep / "sweep.yaml").write_text(
        "name: renamed\nreport: {rows: method.name, columns: bits, metric: loss}\n"
    )
    report.render(sweep)
    md = (sweep / "results.md").read_text()
    assert md.startswith("# renamed\n")
    assert "## Failed cells (2)" in md
    table = _table(md)
    assert list(table) == list(METHODS) and list(table["qat"]) == list(BITS)
    assert f"qjax-run {sweep / 'sweep.yaml'} output_dir=<new dir>" in md


def test_main_cli(tmp_path, capsys):
    sweep = _write(tmp_path, _records())
    assert report.main([str(sweep), "--metric", "loss", "--plot", "bar"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(sweep / n) for n in ("results.md", "results.csv", "results.png", "layers.md")]
    assert (
        f"- rendered with: `qjax-report {sweep} --metric loss --plot bar`"
        in (sweep / "results.md").read_text()
    )
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "results.jsonl not found: run the sweep first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(sweep), "--rows", "nope"])
    assert "'nope' is neither an axis of the sweep" in capsys.readouterr().err


def test_bad_inputs(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"cell": "a"}\n{"cell": \n')
    with pytest.raises(report.ReportError, match=r"results.jsonl:2: not a JSON record"):
        report.load_results(tmp_path)
    (tmp_path / "results.jsonl").write_text("\n")
    with pytest.raises(report.ReportError, match="holds no records yet"):
        report.load_results(tmp_path)
    sweep = _write(tmp_path, _records())
    with pytest.raises(report.ReportError, match=r"report.plot='pie' is not one of \['line', 'bar'\]"):
        report.render(sweep, plot="pie")


def _snapshot(sweep: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(sweep.iterdir())}


def test_a_failing_render_leaves_the_old_files(tmp_path, monkeypatch):
    sweep = _write(tmp_path, _records())
    report.render(sweep)
    before = _snapshot(sweep)
    monkeypatch.setattr(report, "render_plot", lambda p: (_ for _ in ()).throw(RuntimeError("renderer died")))
    with pytest.raises(RuntimeError, match="renderer died"):
        report.render(sweep, metric="loss")  # would change results.md and results.csv
    assert _snapshot(sweep) == before


def test_a_write_killed_midway_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.md"
    target.write_bytes(b"old complete file\n")
    seen = []

    def dying_fsync(fd):
        seen.append(os.fstat(fd).st_size)  # the new data is in the temporary file by now
        raise OSError("disk gone")

    monkeypatch.setattr(report.os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="disk gone"):
        report.write_atomic(target, b"new " * 1000)
    assert seen == [4000]
    assert target.read_bytes() == b"old complete file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]  # no temporary file left


def test_paired_differences_match_numpy(tmp_path):
    records = _records()
    root = _write(tmp_path, records)
    report.render(root, baseline="ptq")
    acc = {
        (r["axes"]["seed"], r["axes"]["method.name"], r["axes"]["bits"]): r["metrics"]["accuracy"]
        for r in records
        if r["status"] == "ok"
    }
    text = (root / "results.md").read_text()
    assert "## Difference to `ptq`, paired by seed" in text
    for bits in BITS:
        d = np.array(
            [
                acc[(s, "qat", bits)] - acc[(s, "ptq", bits)]
                for s in SEEDS
                if (s, "ptq", bits) in acc and (s, "qat", bits) in acc
            ]
        )
        expected = f"{d.mean():+.4f}"
        if len(d) > 1:
            expected += f" ± {d.std(ddof=1):.4f}"
        expected += f" ({int((d > 0).sum())}/{len(d)} > 0)"
        assert f"| {bits} | {expected} |" in text
    with pytest.raises(report.ReportError, match="baseline='lsq' is not a column"):
        report.render(root, baseline="lsq")
