"""experiments.scripts.rounding_table on synthetic records: statistics against numpy, errors."""

import json

import numpy as np
import pytest

from experiments.scripts import rounding_table
from experiments.sweep.pivot import ReportError


def _write(path, records):
    path.mkdir()
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rec(dtype, acc, status="ok", **axes):
    return {
        "cell": json.dumps([dtype, axes]),
        "status": status,
        "axes": {"quant.weights.dtype": dtype, **axes},
        "metrics": {"accuracy": acc},
    }


def test_table_statistics(tmp_path, capsys):
    rng = np.random.default_rng(0)
    fixed = [
        _rec(d, a, rounding=s)
        for d, base in (("int4", 0.9), ("int2", 0.5))
        for s, a in (
            ("nearest", base),
            ("floor", base - 0.3),
            ("ceil", base - 0.4),
            ("adaround", base + 0.01),
        )
    ]
    acc = {"int4": rng.uniform(0.85, 0.92, 20), "int2": rng.uniform(0.3, 0.6, 20)}
    draws = [_rec(d, float(a), **{"quant.rounding_seed": i}) for d in acc for i, a in enumerate(acc[d])]
    draws.append(_rec("int4", 99.0, status="failed", **{"quant.rounding_seed": 99}))  # never counted
    a = _write(tmp_path / "a", fixed)
    b = _write(tmp_path / "b", draws)
    assert rounding_table.main([str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| rounding | int4 | int2 |"
    x4, x2 = acc["int4"], acc["int2"]
    stats = [f"{x.mean():.4f} ± {x.std(ddof=1):.4f}" for x in (x4, x2)]
    assert lines[3] == f"| stochastic (mean ± std) | {stats[0]} | {stats[1]} |"
    assert lines[5] == f"| stochastic, best draw | {x4.max():.4f} | {x2.max():.4f} |"
    assert lines[6] == f"| draws above nearest | {(x4 > 0.9).sum()}/20 | {(x2 > 0.5).sum()}/20 |"
    assert lines[9] == "| AdaRound | 0.9100 | 0.5100 |"


def test_missing_stochastic_results(tmp_path):
    a = _write(tmp_path / "a", [_rec("int3", 0.8, rounding="nearest")])
    b = _write(tmp_path / "b", [_rec("int4", 0.8, **{"quant.rounding_seed": 0})])
    with pytest.raises(ReportError, match=r"no nearest or stochastic results for \['int3'\]"):
        rounding_table.table(
            rounding_table.deterministic(rounding_table.load_results(a)),
            rounding_table.draws(rounding_table.load_results(b)),
        )


def test_llm_table(tmp_path, capsys):
    from experiments.scripts import llm_table

    def layers(*nbytes):  # two block linears of 1000 weights each (float: 4 bytes a weight)
        return [{"path": f"layers/0/{n}", "bytes": b} for n, b in zip("qk", nbytes, strict=True)] + [
            {"path": "lm_head", "bytes": 4e6}
        ]

    recs = [
        {
            "cell": "a",
            "status": "ok",
            "axes": {"variant": "float"},
            "metrics": {"perplexity": 10.0},
            "protocol": {"wall_time_s": 5.0},
            "model": {"size_bytes": 4e6, "layers": layers(4000, 4000)},
        },
        {
            "cell": "b",
            "status": "ok",
            "axes": {"variant": "W4"},
            "metrics": {"perplexity": 12.5, "export_bytes": 1.5e6, "export_perplexity": 12.5},
            "protocol": {"wall_time_s": 7.0},
            "model": {"size_bytes": 1e6, "layers": layers(500, 532)},
        },
        {"cell": "c", "status": "failed", "axes": {"variant": "W2"}, "error": "ValueError: boom\ntrace"},
    ]
    path = _write(tmp_path / "t", recs)
    gptq = {**recs[1], "axes": {"variant": "GPTQ W4"}, "config": {"method": {"name": "ptq", "gptq": True}}}
    qat = {
        **recs[1],
        "cell": "d",
        "axes": {"variant": "QAT W4"},
        "metrics": {"perplexity": 11.0, "ptq_perplexity": 12.5},
        "config": {"method": {"name": "qat", "awq": True}},
    }
    other = _write(tmp_path / "u", [gptq, qat])
    png = tmp_path / "bits.png"
    assert llm_table.main([str(path), str(other), "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[5] == "| float | 10.000 | +0.0% | 32.00 | 5 | 4.0 |  |"
    # (500 + 532) bytes over 2000 weights = 4.128 bits; the float lm_head is not a block linear
    assert lines[6] == "| W4 | 12.500 | +25.0% | 4.13 | 7 | 1.0 | 1.5 / 12.500 |"
    assert lines[7].startswith("| W2 | failed: ValueError: boom")
    # against the first float; a sweep with QAT cells shows where each QAT started
    assert lines[-2] == "| GPTQ W4 | 12.500 | +25.0% | 4.13 | 7 | 1.0 | 1.5 / 12.500 | |"
    assert lines[-1] == "| QAT W4 | 11.000 | +10.0% | 4.13 | 7 | 1.0 |  | 12.500 |"
    assert png.stat().st_size > 10_000
    assert [llm_table.family(r) for r in (gptq, qat, recs[1])] == ["GPTQ", "QAT", "RTN"]
    rotated = {"config": {"method": {"name": "ptq", "gptq": True, "rotation": "hadamard"}}}
    assert llm_table.family(rotated) == "GPTQ + rotation"
    with pytest.raises(ReportError, match="no finished 'float' cell"):
        llm_table.float_record([llm_table.ordered(recs[1:])])
