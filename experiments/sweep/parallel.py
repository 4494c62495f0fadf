"""Cells in parallel on Ray: ``qjax-run CONFIG --workers N`` (a local Ray instance started here) or
``--ray-address ADDR`` / ``RAY_ADDRESS`` (an existing cluster).

Ray Core tasks, not Ray Tune: a cell is a resumable unit of work with its own checkpoints, records
and skip-if-finished logic, which the runner already has; Tune would add its own trial directories,
checkpoint syncing and result reporting on top, and its search algorithms have nothing to search in
a fixed grid. What this needs from an engine is scheduling with resources, dependencies and retries
of lost workers, which tasks give directly.

The graph: one task per float model that the cells need (``runner.float_model``: trains it, or
restores it when finished), and one task per cell that takes its float model's task as an argument,
so Ray starts a cell only when its float model exists (a DAG, not a race for the float model's
lock). Every task declares ``resources`` (CPUs, GPUs) from the config. A worker process that dies
mid-task is replaced and the task run again (``max_retries``); the cell resumes from its last
checkpoint. Tasks return records; only this driver writes ``results.jsonl`` and the report. Cells
claim their directory as in a serial run (``experiments.sweep.claims``), so a parallel run and
other ``qjax-run`` processes can share a sweep directory. A worker process starts without the
config's plug-ins: each task imports them first (:func:`prepare_worker`), so that the names they
register resolve there as in the driver.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments import records
from experiments.sweep import config as config_lib
from experiments.sweep import runner

MAX_RETRIES = 3  # a lost worker's task is run again, resuming from its checkpoints


def prepare_worker(cell: config_lib.Cell) -> None:
    """Make a worker process ready to run ``cell``: import its config's plug-ins (and the
    ``qjax.plugins`` entry points) as the driver did when it read the config."""
    problems = config_lib.import_plugins(list(cell.config.plugins))
    if problems:
        raise config_lib.ConfigError(f"cell {cell.label} in a worker", problems)


def _float_model(cell: config_lib.Cell, sweep_dir: str) -> str | None:
    """Train (or restore) the float model ``cell`` needs; its checkpoint directory (``None`` for a
    pretrained task, which has none)."""
    prepare_worker(cell)
    cfg = cell.config
    task = runner.load_task(cfg)
    if task.pretrained:
        return None
    directory = runner.float_model_dir(cfg, pathlib.Path(sweep_dir))
    with runner.cell_log(directory.with_name(directory.name + ".log")):
        runner.float_model(cfg, task, pathlib.Path(sweep_dir), None)
    return str(directory)


def _cell(
    cell: config_lib.Cell,
    sweep_dir: str,
    env: dict[str, Any],
    before: dict[str, Any] | None,
    float_dir: str | None,
    fail_fast: bool,
) -> runner.Outcome:
    """Run one cell in a worker (after its float model's task: ``float_dir`` is its result)."""
    del float_dir  # only orders this task after the float model's
    prepare_worker(cell)
    return runner.run_claimed(
        cell, pathlib.Path(sweep_dir), env, before, wait=True, write=False, fail_fast=fail_fast
    )


def ray_address(cli_address: str | None) -> str | None:
    """The cluster to use: ``--ray-address``, else ``RAY_ADDRESS``, else ``None`` (start one here)."""
    return cli_address or os.environ.get("RAY_ADDRESS") or None


def run_cells(
    cells: Sequence[config_lib.Cell],
    sweep_dir: pathlib.Path,
    env: dict[str, Any],
    before: Mapping[Any, dict[str, Any]],
    *,
    workers: int | None,
    address: str | None,
    fail_fast: bool,
    on_submit: Callable[[config_lib.Cell], None],
    on_done: Callable[[config_lib.Cell, runner.Outcome], None],
) -> None:
    """Run ``cells`` as Ray tasks; each finished cell's record is added to ``results.jsonl`` here
    (``on_done`` is told too). With ``fail_fast``, the first failure cancels the rest and raises."""
    import ray

    started = not ray.is_initialized()
    if started:
        resources = cells[0].config.resources if cells else None
        per_cell = max(resources.cpus, 1) if resources else 1
        ray.init(
            address=address,
            num_cpus=None if address else math.ceil((workers or 1) * per_cell),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        float_task = ray.remote(max_retries=MAX_RETRIES)(_float_model)
        cell_task = ray.remote(max_retries=MAX_RETRIES)(_cell)
        float_refs: dict[pathlib.Path, Any] = {}
        pending: dict[Any, config_lib.Cell] = {}
        for cell in cells:
            r = cell.config.resources
            options = {"num_cpus": r.cpus, "num_gpus": r.gpus}
            key = runner.float_model_dir(cell.config, sweep_dir)
            if key not in float_refs:
                float_refs[key] = float_task.options(**options).remote(cell, str(sweep_dir))
            ref = cell_task.options(**options).remote(
                cell, str(sweep_dir), env, before.get(cell.label), float_refs[key], fail_fast
            )
            pending[ref] = cell
            on_submit(cell)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except ray.exceptions.RayError as e:  # its float model failed, or its worker was lost
                error = e.as_instanceof_cause() if isinstance(e, ray.exceptions.RayTaskError) else e
                if fail_fast:
                    for ref in pending:
                        ray.cancel(ref)
                    raise error from None
                outcome = runner.Outcome("ran", runner.failure_record(cell, sweep_dir, error))
            if outcome.status in ("ran", "recovered") and outcome.record is not None:
                records.upsert_result(sweep_dir, outcome.record)
            on_done(cell, outcome)
    finally:
        if started:
            ray.shutdown()
