"""``experiments.records``: processes that add records to one ``results.jsonl`` at once lose none."""

import sys

from experiments import records
from tests.processes import run_together

WRITER = """
import pathlib, sys
from experiments import records
sweep_dir, name = pathlib.Path(sys.argv[1]), sys.argv[2]
for i in range(300):
    records.upsert_result(sweep_dir, {"cell": f"{name}-{i}", "status": "ok", "i": i})
"""


def test_two_processes_adding_300_records_each_keep_all_600(tmp_path):
    writers = [[sys.executable, "-c", WRITER, str(tmp_path), name] for name in ("a", "b")]
    done = run_together(writers, timeout=120)
    assert [code for code, _ in done] == [0, 0], done
    cells = sorted(r["cell"] for r in records.read_results(tmp_path))
    assert cells == sorted(f"{name}-{i}" for name in ("a", "b") for i in range(300))


def test_a_record_replaces_the_earlier_one_of_its_cell(tmp_path):
    records.upsert_result(tmp_path, {"cell": "a", "status": "failed"})
    records.upsert_result(tmp_path, {"cell": "b", "status": "ok"})
    records.upsert_result(tmp_path, {"cell": "a", "status": "ok"})
    assert records.read_results(tmp_path) == [{"cell": "b", "status": "ok"}, {"cell": "a", "status": "ok"}]
