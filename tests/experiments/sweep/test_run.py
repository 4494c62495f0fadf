"""The progress display of qjax-run (experiments.sweep.run): readable at 80 columns, quiet under CI."""

import re

from rich.console import Console

from experiments.sweep import run

LABEL = "seed=0,bits=W4A8,granularity=per_channel,method.name=qat"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def render(progress) -> list[str]:
    console = Console(width=80, record=True, force_terminal=False)
    console.print(progress.make_tasks_table(progress.tasks))
    return console.export_text().splitlines()


def test_progress_at_80_columns_shows_cells_steps_eta_and_loss():
    clock = Clock()
    progress = run.make_progress(Console(width=80, force_terminal=False), get_time=clock)
    overall = progress.add_task("cells", total=4, completed=1, loss="")
    task = progress.add_task("cell 2/4: " + LABEL, total=None, loss="")
    cell = run.CellProgress(progress, task, "cell 2/4", LABEL)
    cell.begin("qat", 20, 300)  # resumed at step 20 of 300
    clock.now = 5.0
    cell.advance("qat", 70)
    clock.now = 10.0
    cell.advance("qat", 120)  # 100 steps in 10 s: 180 left, 18 s
    cell.log("qat", 120, {"loss": 0.34125, "lr": 1e-3})
    lines = render(progress)
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines)
    cells, steps = lines
    assert cells.startswith("cells") and " 1/4 " in cells
    assert steps.startswith("cell 2/4 qat: seed=0,bits=W4A8")
    assert "…" in steps  # the label is cut, the numbers are not
    assert re.search(r" 120/300 eta 0:00:18 loss 0\.3412\s*$", steps), steps
    assert "━ …" not in steps
    progress.update(overall, advance=1)
    cell.begin("qat", 0, 12)  # the next phase: its own count, no speed and no loss yet
    clock.now = 11.0  # past the ETA column's 0.5 s refresh
    assert re.search(r" 0/12 eta -:--:-- *$", render(progress)[1])


def test_progress_is_off_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert run.quiet()
    console = Console(width=80, record=True, force_terminal=True)
    with run.make_progress(console, disable=run.quiet()) as progress:
        task = progress.add_task("cells", total=2, loss="")
        progress.update(task, advance=1)
    assert console.export_text() == ""
    monkeypatch.setenv("CI", "false")
    assert not run.quiet()
