"""``qjax-run CONFIG [key=value ...]``: run a sweep of experiments from a YAML config.

.. code-block:: text

    qjax-run configs/quickstart.yaml
    qjax-run configs/fashion_mnist/ptq_vs_qat.yaml sweep.seed=[0,1,2] train.epochs=3
    qjax-run configs/fashion_mnist/ptq_vs_qat.yaml --dry-run     # print the grid, run nothing

The whole grid is validated before anything runs. Cells already finished (a record with the same
config hash and status ``ok`` in ``results.jsonl``) are skipped; a killed cell resumes from its
last checkpoint; a failing cell is recorded with its error and the sweep goes on unless
``--fail-fast``. Several processes may run one sweep directory at once
(``experiments.sweep.claims``): each cell runs in one of them, each float model is trained by one
and awaited by the others. The report (``results.md``, ``results.csv``, ``results.png``,
``layers.md``) is rendered at the end; ``qjax-report SWEEP_DIR`` renders it again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import hosts, parallel, report, runner, validation
from experiments.sweep.schema import ExperimentConfig, Method

logger = logging.getLogger("qjax.experiments")


def quiet() -> bool:
    """No progress bars under CI (``CI`` set to anything but empty/false/0)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def data_problems(cfg: ExperimentConfig, n_train: int) -> list[str]:
    """Sizes that need the training set's length: a training batch larger than it would leave no
    full batch (0 optimizer steps, an untrained model recorded as trained)."""
    if cfg.train.batch_size <= n_train:
        return []
    return [
        f"train.batch_size={cfg.train.batch_size} is larger than the {n_train} training examples "
        f"(task.train_limit={cfg.task.train_limit}); use at most {n_train}"
    ]


def check_layers(cells: Sequence[config_lib.Cell]) -> list[str]:
    """Problems that need the data or the model: batch sizes and step counts against the training
    set (:func:`data_problems`), a spec that does not fit a layer (e.g. a group size that does not
    divide its contraction dimension). Each distinct task, prepared model (batch norms folded, LLM
    rotated) and (prepared model, quant) is built once."""
    problems, seen = [], set()
    tasks: dict[str, Any] = {}
    bases: dict[tuple[Any, ...], Any] = {}
    for cell in cells:
        cfg = cell.config
        try:
            if repr(cfg.task) not in tasks:
                tasks[repr(cfg.task)] = runner.load_task(cfg)
            task = tasks[repr(cfg.task)]
        except (ValueError, TypeError, OSError) as e:
            problems.append(f"{cell.label}: {e}")
            continue
        problems += [
            f"{cell.label}: {p}" for p in ([] if task.pretrained else data_problems(cfg, len(task.train)))
        ]
        if cfg.method.name == Method.FLOAT:
            continue
        m = cfg.method
        prepared = (repr(cfg.task), m.fold_batchnorm, m.rotation, m.rotation_online_down, m.rotation_qk)
        key = (*prepared, repr(cfg.quant))
        if key in seen:
            continue
        seen.add(key)
        try:
            if prepared not in bases:
                model = task.make_model(cfg.task.model, dict(cfg.task.model_args), 0)
                bases[prepared] = runner.prepare_base(cfg, task, model)
            runner.quantize(cfg, bases[prepared], cell.plan.rules)
        except (ValueError, TypeError) as e:
            problems.append(f"{cell.label}: {e}")
    return problems


def print_grid(spec: config_lib.SweepSpec, cells: Sequence[config_lib.Cell], console: Console) -> None:
    console.print(f"sweep {spec.base.name!r}: {len(cells)} cells -> {sweep_dir_of(spec)}")
    for cell in cells:
        q = validation.with_recipe([], cell.config.quant)
        w = (q.weights or {}).get("dtype", "float")
        a = (q.activations or {}).get("dtype", "float")
        g = f" G={q.gradients['dtype']}" if q.gradients else ""
        line = f"  {cell.slug}  {cell.label}  [method={cell.config.method.name} W={w} A={a}{g}]"
        console.print(escape(line))


def sweep_dir_of(spec: config_lib.SweepSpec) -> pathlib.Path:
    return pathlib.Path(spec.base.output_dir) / spec.base.name


class EtaColumn(TimeRemainingColumn):
    """``eta 0:01:23``: the time left at the recent speed (``-:--:--`` until there is one)."""

    def render(self, task: Task) -> Text:
        return Text.assemble("eta ", super().render(task))


def make_progress(
    console: Console, *, disable: bool = False, get_time: Callable[[], float] | None = None
) -> Progress:
    """The sweep's progress display: a row ``cells`` (``n/N`` cells done) and a row per running
    cell (``cell k/N <phase>: <label>``, steps ``s/S`` of the phase, ETA, last logged loss). The
    description takes what the other columns leave and is cut with an ellipsis, so that the
    counts, the ETA and the loss stay readable at 80 columns. Every task needs a ``loss`` field."""
    columns: tuple[ProgressColumn, ...] = (
        TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
        BarColumn(bar_width=10),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        EtaColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[loss]}", table_column=Column(no_wrap=True)),
    )
    return Progress(*columns, console=console, disable=disable, expand=True, get_time=get_time)


class CellProgress:
    """A cell's progress row as a :class:`~experiments.sweep.tracking.TrainObserver`: each phase
    resets the row to its steps, every step moves it (no device value is read), every logged step
    shows its loss."""

    def __init__(self, progress: Progress, task: TaskID, prefix: str, label: str):
        self.progress, self.task, self.prefix, self.label = progress, task, prefix, label

    def begin(self, phase: str, step: int, steps: int) -> None:
        description = f"{self.prefix} {phase}: {self.label}"
        self.progress.reset(self.task, total=steps, completed=step, description=description, loss="")

    def advance(self, phase: str, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def log(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        self.progress.update(self.task, loss=f"loss {metrics['loss']:.4g}")


def finished_hashes(results: list[dict[str, Any]]) -> set[str]:
    """Hashes of the cells finished in ``results``: each ``ok`` record's own hash, and the hash of
    its config read by today's schema (fields added since it ran take their defaults), so that a
    field added to the schema does not make finished cells look new."""
    done = set()
    for r in results:
        if r.get("status") != "ok":
            continue
        done.add(r["hash"])
        # a config today's schema cannot read: only its recorded hash counts
        with contextlib.suppress(KeyError, TypeError, ValueError):
            done.add(config_lib.config_hash(config_lib.from_dict(r["config"])))
    return done


def check_writable(sweep_dir: pathlib.Path) -> None:
    """Refuse, before compute, a sweep directory this process cannot write (records, checkpoints
    and the report go there): it, or the nearest folder above it that exists."""
    if not records.writes():
        return
    existing = sweep_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probes = [existing] + ([p for p in existing.iterdir() if p.is_dir()] if existing == sweep_dir else [])
    blocked = [p for p in probes if not os.access(p, os.W_OK | os.X_OK)]
    if blocked:
        raise config_lib.ConfigError(
            f"output_dir: {blocked[0]} is not writable; give output_dir=<a folder you can write>, or "
            f"change the folder's permissions (a finished sweep's results stay readable in {sweep_dir})"
        )


def check_same_configs(
    cells: Sequence[config_lib.Cell], before: dict[Any, dict[str, Any]], sweep_dir: pathlib.Path
) -> None:
    """Refuse to run cells whose label has an ``ok`` record of another config in ``sweep_dir``
    (the same sweep rerun with a changed override): replacing those records one by one would leave
    the directory, and its report, a mix of two configs."""
    changed = []
    for cell in cells:
        prior = before.get(cell.label)
        if not prior or prior.get("status") != "ok" or prior.get("hash") == cell.hash:
            continue
        old = config_lib.normalized_config(prior)
        diff = config_lib.config_differences(old, config_lib.to_dict(cell.config))
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:4])
            changed.append(f"{cell.label} ({shown})")
    if changed:
        raise config_lib.ConfigError(
            f"{sweep_dir} holds finished cells of another config under the same labels: "
            + "; ".join(changed[:3])
            + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
            + ". Give this config its own name= (or output_dir=), or delete "
            f"{sweep_dir / records.RESULTS} to rerun the sweep from scratch"
        )


def run_sweep(
    spec: config_lib.SweepSpec,
    *,
    fail_fast: bool = False,
    console: Console | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> pathlib.Path:
    """Run every unfinished cell of ``spec``; returns the sweep directory. With ``workers`` or
    ``ray_address``, the cells run as Ray tasks (``experiments.sweep.parallel``), else one by one."""
    console = console or Console(quiet=quiet())
    cells = spec.cells()
    problems = check_layers(cells)
    if problems:
        raise config_lib.ConfigError("the config does not fit the model:\n" + "\n".join(problems))
    sweep_dir = sweep_dir_of(spec)
    check_writable(sweep_dir)
    started = records.read_results(sweep_dir)
    before = {r.get("cell"): r for r in started}
    check_same_configs(cells, before, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    records.write_atomic(sweep_dir / "sweep.yaml", spec.dump_yaml())
    done = finished_hashes(started)
    if hosts.several():  # every process runs the cells that process 0 found unfinished
        done = {c.hash for c in cells if hosts.agree(int(c.hash in done))}
    env = records.environment()
    todo = [c for c in cells if c.hash not in done]
    console.print(f"{sweep_dir}: {len(cells)} cells, {len(cells) - len(todo)} already done")
    with make_progress(console, disable=quiet()) as progress:
        overall = progress.add_task("cells", total=len(cells), completed=len(cells) - len(todo), loss="")
        if workers is not None or ray_address is not None:
            _run_on_ray(
                todo, sweep_dir, env, before, progress, overall, console, fail_fast, workers, ray_address
            )
        else:
            _run_here(todo, sweep_dir, env, before, progress, overall, console, fail_fast)
    if records.writes():
        report.render(sweep_dir)
    return sweep_dir


def _run_on_ray(
    todo: list[config_lib.Cell],
    sweep_dir: pathlib.Path,
    env: dict[str, Any],
    before: dict[Any, dict[str, Any]],
    progress: Progress,
    overall: TaskID,
    console: Console,
    fail_fast: bool,
    workers: int | None,
    ray_address: str | None,
) -> None:
    """The cells as Ray tasks, one progress row per cell in flight."""
    running: dict[str, TaskID] = {}

    def submitted(cell: config_lib.Cell) -> None:
        running[cell.label] = progress.add_task(f"  {cell.label}", total=None, loss="")

    def finished(cell: config_lib.Cell, outcome: runner.Outcome) -> None:
        progress.remove_task(running.pop(cell.label))
        report_outcome(cell, outcome, console)
        progress.advance(overall)

    parallel.run_cells(
        todo,
        sweep_dir,
        env,
        before,
        workers=workers,
        address=ray_address,
        fail_fast=fail_fast,
        on_submit=submitted,
        on_done=finished,
    )


def _run_here(
    todo: list[config_lib.Cell],
    sweep_dir: pathlib.Path,
    env: dict[str, Any],
    before: dict[Any, dict[str, Any]],
    progress: Progress,
    overall: TaskID,
    console: Console,
    fail_fast: bool,
) -> None:
    """The cells one by one in this process: first those no other process holds, then (waiting for
    them) the ones another process held."""
    pending, wait = todo, False
    while pending:
        deferred = []
        for cell in pending:
            cells = next(t for t in progress.tasks if t.id == overall)
            prefix = f"cell {int(cells.completed) + 1}/{int(cells.total or 0)}"
            steps = progress.add_task(f"{prefix}: {cell.label}", total=None, loss="")
            try:
                outcome = runner.run_claimed(
                    cell,
                    sweep_dir,
                    env,
                    before.get(cell.label),
                    wait=wait,
                    write=True,
                    fail_fast=fail_fast,
                    observer=CellProgress(progress, steps, prefix, cell.label),
                )
            finally:
                progress.remove_task(steps)
            if outcome.status == "busy":
                deferred.append(cell)
                continue
            report_outcome(cell, outcome, console)
            progress.advance(overall)
        pending, wait = deferred, True


def report_outcome(cell: config_lib.Cell, outcome: runner.Outcome, console: Console) -> None:
    """One console line for a cell that failed or that another process settled."""
    record = outcome.record or {}
    if outcome.status == "settled":
        console.print(escape(f"{cell.label}: {record.get('status')} in another process"))
    elif record.get("status") == "failed":
        detail = escape(f"{cell.label}: {record.get('error')}")
        console.print(f"[red]failed[/red] {detail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qjax-run", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. sweep.seed=[0,1,2]")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the grid, run nothing")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing cell")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run N cells at once as tasks of a local Ray instance started here (resources: per cell)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="run the cells on an existing Ray cluster (default: $RAY_ADDRESS when --workers is not given)",
    )
    processes = parser.add_argument_group(
        "one cell over several processes (run the same command on every host; see docs/scale.md)"
    )
    processes.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    processes.add_argument("--num-processes", type=int, metavar="N", help="how many processes in all")
    processes.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")
    processes.add_argument(
        "--distributed",
        action="store_true",
        help="let jax.distributed find the cluster (SLURM, TPU pod, Kubernetes, JAX_COORDINATOR_ADDRESS)",
    )
    processes.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        metavar="S",
        help="seconds after which the other processes stop when one has died (default 100)",
    )
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: give at least 1 (or leave it out to run cells one by one)")
    address = args.ray_address or (None if args.workers else parallel.ray_address(None))
    multi = args.distributed or args.coordinator is not None or args.num_processes is not None
    if multi and (args.workers is not None or args.ray_address is not None):
        parser.error(
            "--workers/--ray-address run each cell in one process; with several processes per cell "
            "(--coordinator or --distributed) leave them out"
        )
    try:
        hosts.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            auto=args.distributed,
            heartbeat_timeout=args.heartbeat_timeout,
        )
    except ValueError as e:
        parser.error(str(e))
    if multi:
        address = None  # RAY_ADDRESS in the environment does not apply to a multi-process cell
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(quiet=(quiet() and not args.dry_run) or not records.writes())
    try:
        spec = config_lib.load(args.config, args.overrides)
        cells = spec.cells()
        if args.dry_run:
            problems = check_layers(cells)
            print_grid(spec, cells, console)
            if problems:
                raise config_lib.ConfigError("the config does not fit the model:\n" + "\n".join(problems))
            return 0
        sweep_dir = run_sweep(
            spec, fail_fast=args.fail_fast, console=console, workers=args.workers, ray_address=address
        )
    except config_lib.ConfigError as e:
        print(f"qjax-run: invalid config {args.config}:\n{e}", file=sys.stderr)
        return 2
    except records.ResultsError as e:
        print(f"qjax-run: {e}", file=sys.stderr)
        return 2
    if records.writes():
        print((sweep_dir / "results.md").read_text())
    failed = failed_cells(cells, sweep_dir) if records.writes() else []
    if hosts.agree(len(failed)):  # several processes: process 0 has read the records it wrote
        if failed:
            print(
                f"qjax-run: {len(failed)} of {len(cells)} cells failed (see their records and "
                f"cells/<slug>/log.txt; rerun to retry them): {', '.join(failed)}",
                file=sys.stderr,
            )
        return 1
    return 0


def failed_cells(cells: Sequence[config_lib.Cell], sweep_dir: pathlib.Path) -> list[str]:
    """Labels of the cells of ``cells`` whose record in ``results.jsonl`` is not ``ok``."""
    by_label = {r.get("cell"): r for r in records.read_results(sweep_dir)}
    return [c.label for c in cells if by_label.get(c.label, {}).get("status") != "ok"]


if __name__ == "__main__":
    sys.exit(main())
