"""experiments.sweep.report (with experiments.sweep.pivot and experiments.sweep.plot) on synthetic
results.jsonl records: numbers against numpy, files, order, atomic writes; several keys per side,
unnamed axes split or refused, never pooled; missing metrics; the title follows the metric; the
plot's y range follows the data."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import pathlib
import re

import numpy as np
import pytest

from experiments.sweep import pivot, plot, report
from experiments.sweep.schema import Plot

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


def _tables(md: str) -> list[list[list[str]]]:
    """Every markdown table of ``md``: its lines (header first, no separator) as lists of cells."""
    tables: list[list[list[str]]] = []
    current = None
    for line in md.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        if current is None:
            current = []
            tables.append(current)
        if not set(line) <= set("|- "):  # not the separator line
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
    return tables


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
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["bits", "method.name", "mean", "std", "n"]  # the keys name the columns
    assert [(r["bits"], r["method.name"]) for r in rows] == list(itertools.product(BITS, METHODS))
    for r in rows:
        values = _values(records, r["method.name"], r["bits"])
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
    assert pivot.ordered(["16", "4", "8"]) == ["4", "8", "16"]
    assert pivot.ordered(["W8A8", "W4A8", "W8A8", "W2A8"]) == ["W8A8", "W4A8", "W2A8"]
    assert pivot.ordered([0.5, 0.25, 1.0]) == ["0.25", "0.5", "1"]
    assert pivot.ordered([True, False]) == ["true", "false"]  # bools are labels, not numbers
    assert pivot.ordered_labels([("b", 8), ("a", 2), ("b", 2)]) == [("b", "2"), ("b", "8"), ("a", "2")]


def test_lookup_prefers_axes_then_dotted_config():
    record = {
        "cell": "c",
        "axes": {"bits": "W4A8", "method.name": "qat"},
        "config": {"method": {"name": "ptq"}},
    }
    assert pivot.lookup(record, "bits") == "W4A8"
    assert pivot.lookup(record, "method.name") == "qat"
    assert pivot.lookup({**record, "axes": {}}, "method.name") == "ptq"
    with pytest.raises(
        report.ReportError, match=r"'method.nme' is neither an axis of the sweep \(bits, method.name\)"
    ):
        pivot.lookup(record, "method.nme")
    with pytest.raises(report.ReportError, match="metric 'acc' is not in the record of cell 'c'"):
        pivot.metric_value({**record, "metrics": {"accuracy": 1.0}}, "acc")
    assert pivot.metric_value({"metrics": {"loss": 2}}, "loss") == 2.0
    assert pivot.metric_or_none({"metrics": {"loss": 2}}, "accuracy") is None


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
    assert md.startswith("# renamed: loss\n")  # no title given: the sweep's name and the metric
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
    with pytest.raises(report.ReportError, match=r"report.plot: 'pie' is not one of auto, line, point, bar"):
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
    paired = _tables(text)[1]
    assert paired[0] == ["bits \\ method.name", "qat"]
    paired_cells = {row[0]: row[1] for row in paired[1:]}
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
        assert paired_cells[bits] == expected
    with pytest.raises(report.ReportError, match="baseline='lsq' is not a column"):
        report.render(root, baseline="lsq")


# -- several keys per side, unnamed axes, missing metrics, titles, the plot's range ------------------

GRANULARITY = {"per-tensor": "per_tensor", "per-channel": "per_channel"}  # a named axis
DTYPES = ("int4", "int2")
LEVEL = {"float": 0.92, "ptq": 0.80, "qat": 0.90}  # pooling ptq with qat would land near 0.85


def _grid(methods=("ptq", "qat"), seeds=SEEDS):
    """seed x method.name x quant.weights.dtype x granularity; ``serve_accuracy`` only where quantized."""
    rng = np.random.default_rng(1)
    out = []
    for seed, method, dtype, gran in itertools.product(seeds, methods, DTYPES, GRANULARITY):
        accuracy = LEVEL[method] + float(rng.normal(0, 0.005))
        metrics = {"accuracy": accuracy, "loss": float(rng.uniform(0.2, 0.4))}
        if method != "float":
            metrics["serve_accuracy"] = accuracy - 0.001
        axes = {"seed": seed, "method.name": method, "quant.weights.dtype": dtype, "granularity": gran}
        config = {
            "name": "grid",
            "seed": seed,
            "method": {"name": method},
            "quant": {"weights": {"dtype": dtype, "granularity": GRANULARITY[gran]}},
        }
        cell = ",".join(f"{k}={v}" for k, v in axes.items())
        out.append(
            {"cell": cell, "status": "ok", "error": None, "axes": axes, "config": config, "metrics": metrics}
        )
    return out


def _grid_values(records, metric="accuracy", **where):
    """``metric`` of the records whose axes take the values ``where`` (``__`` for ``.`` in keys)."""
    where = {k.replace("__", "."): v for k, v in where.items()}
    return np.array(
        [
            r["metrics"][metric]
            for r in records
            if metric in r["metrics"] and all(r["axes"][k] == v for k, v in where.items())
        ]
    )


def _mean_std(text: str) -> tuple[float, float]:
    mean, std = text.split(" ± ")
    return float(mean), float(std.split()[0])


def test_several_keys_per_side_from_the_command_line_and_the_yaml_block(tmp_path):
    records = _grid()
    sweep = _write(tmp_path, records)
    report.render(sweep, rows="quant.weights.dtype,method.name", columns=["granularity"])
    md = (sweep / "results.md").read_text()
    [table] = _tables(md)
    assert table[0] == ["quant.weights.dtype", "method.name \\ granularity", "per-tensor", "per-channel"]
    assert [row[:2] for row in table[1:]] == [[d, m] for d in DTYPES for m in ("ptq", "qat")]
    for row in table[1:]:
        for gran, text in zip(GRANULARITY, row[2:], strict=True):
            values = _grid_values(
                records, quant__weights__dtype=row[0], method__name=row[1], granularity=gran
            )
            mean, std = _mean_std(text)
            assert len(values) == len(SEEDS)
            assert mean == pytest.approx(values.mean(), abs=5e-5)
            assert std == pytest.approx(values.std(ddof=1), abs=5e-5)
    assert "## " not in md.split("## Protocol")[0]  # nothing left to split
    with open(sweep / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        lines = list(reader)
    assert reader.fieldnames == ["quant.weights.dtype", "method.name", "granularity", "mean", "std", "n"]
    assert len(lines) == 8 and {line["n"] for line in lines} == {"3"}
    # the same pivot from the sweep.yaml block, as a list and as a comma-separated string
    before = (sweep / "results.csv").read_text()
    for rows in ("[quant.weights.dtype, method.name]", "'quant.weights.dtype, method.name'"):
        (sweep / "sweep.yaml").write_text(f"name: grid\nreport: {{rows: {rows}, columns: granularity}}\n")
        report.render(sweep)
        assert (sweep / "results.csv").read_text() == before


def test_an_unnamed_axis_splits_the_tables_never_pools(tmp_path):
    records = _grid()
    sweep = _write(tmp_path, records)
    report.render(sweep, rows="quant.weights.dtype", columns="granularity", baseline="per-channel")
    md = (sweep / "results.md").read_text()
    assert "One table per value of `method.name`" in md and "`--pool method.name`" in md
    sections = md.split("## Protocol")[0].split("\n## method.name = ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["ptq", "qat"]
    for method, section in zip(("ptq", "qat"), sections, strict=True):
        table = _table(section)
        assert list(table) == list(DTYPES)
        for dtype, gran in itertools.product(DTYPES, GRANULARITY):
            values = _grid_values(records, method__name=method, quant__weights__dtype=dtype, granularity=gran)
            mean, _ = _mean_std(table[dtype][gran])
            assert mean == pytest.approx(values.mean(), abs=5e-5)
            assert abs(mean - LEVEL[method]) < 0.02  # ptq and qat are never averaged together
        assert "### Difference to `per-channel`, paired by seed" in section
    with open(sweep / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        lines = list(reader)
    assert reader.fieldnames == ["method.name", "quant.weights.dtype", "granularity", "mean", "std", "n"]
    assert [(x["method.name"], x["quant.weights.dtype"]) for x in lines[::2]] == [
        (m, d) for m in ("ptq", "qat") for d in DTYPES
    ]
    # pooled when asked, and then the caption says so
    report.render(sweep, rows="quant.weights.dtype", columns="granularity", pool="method.name")
    md = (sweep / "results.md").read_text()
    assert "mean ± sample std over seed and method.name (6 per cell" in md
    assert "Averaged over `method.name` as asked (`report.pool`)" in md
    table = _table(md)
    values = _grid_values(records, quant__weights__dtype="int2", granularity="per-tensor")
    assert _mean_std(table["int2"]["per-tensor"])[0] == pytest.approx(values.mean(), abs=5e-5)
    # a named axis pooled on request: its labels set other config keys, which is no config mix-up
    report.render(sweep, rows="method.name", columns="quant.weights.dtype", pool="granularity")
    assert len(_tables((sweep / "results.md").read_text())) == 1


def test_split_and_pooled_axes():
    records = _grid()
    for r in records:  # an axis that the rows determine: it never splits
        r["axes"]["tag"] = r["axes"]["method.name"].upper()
    config = report.ReportConfig(rows=("method.name",), columns=("granularity",))
    assert pivot.split_and_pooled(records, config) == (("quant.weights.dtype",), ("seed",))
    config = report.ReportConfig(
        rows=("method.name",), columns=("granularity",), pool=("quant.weights.dtype",)
    )
    assert pivot.split_and_pooled(records, config) == ((), ("seed", "quant.weights.dtype"))
    config = report.ReportConfig(rows=("seed",), columns=("granularity",))  # the seed shown, not averaged
    assert pivot.split_and_pooled(records, config) == (("method.name", "quant.weights.dtype"), ())
    with pytest.raises(
        report.ReportError, match=r"pool='model' is not an axis of these results; the axes are"
    ):
        pivot.split_and_pooled(records, dataclasses.replace(config, pool=("model",)))
    with pytest.raises(report.ReportError, match=r"pool='granularity' is a row or column key"):
        pivot.split_and_pooled(records, dataclasses.replace(config, pool=("granularity",)))


def test_too_many_tables_are_refused_with_the_axes_and_the_fix(tmp_path):
    records = []
    for draw, dtype in itertools.product(range(pivot.MAX_TABLES + 1), DTYPES):
        axes = {"quant.rounding_seed": draw, "quant.weights.dtype": dtype}
        quant = {"rounding_seed": draw, "weights": {"dtype": dtype}}
        config = {"name": "draws", "method": {"name": "ptq"}, "quant": quant}
        records.append(
            {
                "cell": f"{draw},{dtype}",
                "status": "ok",
                "axes": axes,
                "config": config,
                "metrics": {"accuracy": 0.5},
            }
        )
    sweep = _write(tmp_path, records)
    with pytest.raises(
        report.ReportError,
        match=r"axes quant.rounding_seed vary within the table cells .* 25 tables.*--pool quant.rounding_",
    ):
        report.render(sweep, rows="quant.weights.dtype", columns="method.name")
    assert not (sweep / "results.md").exists()
    report.render(sweep, rows="quant.weights.dtype", columns="method.name", pool="quant.rounding_seed")
    assert "over quant.rounding_seed (25 per cell" in (sweep / "results.md").read_text()


def test_a_metric_missing_in_some_cells_is_a_dash_never_refused(tmp_path):
    records = _grid(methods=("float", "ptq", "qat"), seeds=(0, 1))
    sweep = _write(tmp_path, records)
    report.render(
        sweep, rows="method.name", columns="granularity", pool="quant.weights.dtype", metric="serve_accuracy"
    )
    md = (sweep / "results.md").read_text()
    table = _table(md)
    assert table["float"] == {"per-tensor": "-", "per-channel": "-"}
    for method, gran in itertools.product(("ptq", "qat"), GRANULARITY):
        values = _grid_values(records, "serve_accuracy", method__name=method, granularity=gran)
        assert _mean_std(table[method][gran])[0] == pytest.approx(values.mean(), abs=5e-5)
    assert "`-`: no record of the cell has `serve_accuracy`." in md
    with open(sweep / "results.csv", newline="") as f:
        lines = {(x["method.name"], x["granularity"]): x for x in csv.DictReader(f)}
    assert lines[("float", "per-tensor")]["mean"] == "" and lines[("float", "per-tensor")]["n"] == "0"
    assert float(lines[("ptq", "per-tensor")]["mean"]) > 0.7
    with pytest.raises(
        report.ReportError,
        match=r"no record has the metric 'serve_acc'; the metrics are accuracy, loss, serve_accuracy",
    ):
        report.render(sweep, rows="method.name", columns="granularity", metric="serve_acc")


def test_the_title_follows_the_metric_rendered(tmp_path):
    sweep = _write(tmp_path, _grid())
    (sweep / "sweep.yaml").write_text(
        "name: grid\nreport: {rows: quant.weights.dtype, columns: granularity, pool: [method.name], "
        "metric: accuracy, title: 'Granularity (test accuracy)'}\n"
    )
    report.render(sweep)
    assert (sweep / "results.md").read_text().startswith("# Granularity (test accuracy)\n\n`accuracy`, ")
    report.main([str(sweep), "--metric", "loss"])  # the command line wins, the title was for accuracy
    md = (sweep / "results.md").read_text()
    assert md.startswith("# grid: loss\n\n`loss`, mean ± sample std over seed and method.name")
    assert (sweep / "layers.md").read_text().startswith("# grid: loss: per-layer SQNR")
    report.render(sweep, metric="loss", title="Granularity (loss)")
    assert (sweep / "results.md").read_text().startswith("# Granularity (loss)\n")
    records = report.load_results(sweep)
    cfg = report.report_config(sweep, records, metric="loss")
    fig = plot.figure(pivot.pivot(records, cfg))
    assert fig.get_suptitle() == "grid: loss"
    assert {ax.get_ylabel() for ax in fig.axes} == {"loss"}


def test_a_baseline_follows_the_columns_it_was_given_with(tmp_path):
    sweep = _write(tmp_path, _grid())
    (sweep / "sweep.yaml").write_text(
        "name: grid\nreport: {rows: quant.weights.dtype, columns: granularity, baseline: per-channel, "
        "pool: [method.name]}\n"
    )
    report.render(sweep, columns="granularity")  # the same columns: the baseline stays
    assert (
        "## Difference to `per-channel`, paired by seed and method.name" in (sweep / "results.md").read_text()
    )
    report.render(sweep, columns="seed", pool="")  # other columns: a baseline for them is not 'per-channel'
    md = (sweep / "results.md").read_text()
    assert "Difference to" not in md and "One table per combination of `method.name`, `granularity`" in md
    with pytest.raises(
        report.ReportError, match=r"report.baseline='9' is not a column; the columns are \['0', '1', '2'\]"
    ):
        report.render(sweep, columns="seed", pool="", baseline="9")


def test_y_limits():
    assert plot.y_limits([1.0, 2.0], [3.0, 4.0]) == pytest.approx((1.0 - 0.15, 4.0 + 0.15))
    assert plot.y_limits([0.5], [0.5]) == pytest.approx((0.475, 0.525))  # no span: 5 % of the value
    assert plot.y_limits([0.0], [0.0]) == pytest.approx((-0.05, 0.05))
    assert plot.y_limits([float("nan"), 0.8], [0.9, float("inf")], margin=0.1) == pytest.approx((0.79, 0.91))


def _data_range(records, split, rows, columns):
    """(min of mean - std, max of mean + std) over the cells, by numpy."""
    groups = {}
    for r in records:
        key = tuple(r["axes"][k] for k in (*split, *rows, *columns))
        groups.setdefault(key, []).append(r["metrics"]["accuracy"])
    stats = [(np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 0.0) for v in groups.values()]
    return min(m - s for m, s in stats), max(m + s for m, s in stats)


def test_the_plot_zooms_to_the_data_one_subplot_per_table():
    records = _grid()
    cfg = report.ReportConfig(rows=("quant.weights.dtype",), columns=("granularity",))
    p = pivot.pivot(records, cfg)
    assert plot.plot_kind(p) is Plot.POINT  # categorical rows
    fig = plot.figure(p)
    assert [ax.get_title() for ax in fig.axes] == ["method.name = ptq", "method.name = qat"]
    lo, hi = _data_range(records, ["method.name"], ["quant.weights.dtype"], ["granularity"])
    margin = 0.05 * (hi - lo)
    for ax in fig.axes:
        assert ax.get_ylim() == pytest.approx((lo - margin, hi + margin), rel=1e-9)
        assert [c.lines[0].get_linestyle() for c in ax.containers] == ["None", "None"]  # points, not joined
    assert lo - margin > 0.7 and hi + margin < 1.0  # not 0 to 1
    # numeric rows: a line plot, also zoomed
    numeric = [
        dict(r, axes={**r["axes"], "bits": int(r["axes"]["quant.weights.dtype"][3:])}) for r in records
    ]
    cfg = report.ReportConfig(
        rows=("bits",), columns=("method.name",), pool=("quant.weights.dtype", "granularity")
    )
    p = pivot.pivot(numeric, cfg)
    assert plot.plot_kind(p) is Plot.LINE
    [ax] = plot.figure(p).axes
    assert [c.lines[0].get_linestyle() for c in ax.containers] == ["-", "-"]  # one line per column
    lo, hi = _data_range(numeric, [], ["bits"], ["method.name"])
    assert ax.get_ylim() == pytest.approx((lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)), rel=1e-9)
    # bars start at 0
    [ax] = plot.figure(pivot.pivot(numeric, dataclasses.replace(cfg, plot=Plot.BAR))).axes
    assert ax.get_ylim()[0] <= 0.0
