"""One cell over several processes (hosts): ``qjax-run CONFIG --coordinator HOST:PORT
--num-processes N --process-id I`` on every host, or ``--distributed`` where
``jax.distributed.initialize()`` finds the cluster itself (SLURM, TPU pods, Kubernetes, or the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables).

Every process runs the same cells in the same order on one mesh that spans all their devices
(``experiments.sweep.placement``). Process 0 takes the decisions that depend on files (which cells
are finished, which checkpoint to resume from: :func:`agree`, and
``qjax.training.TrainingCheckpointer``) and is the only one that writes records, reports and logs
(``experiments.records.write_atomic`` writes nothing on the others). Checkpoints go through orbax,
which writes each process's shards to the shared directory.

A cell that fails in a process stops the whole job: the other processes are waiting on it inside
collectives and cannot go on, so the failing process prints which cell failed and why and exits at
once (code 1) rather than wait at jax's shutdown barrier, and jax's coordination service ends the
others (after ``--heartbeat-timeout`` seconds). Rerunning the same command on every host resumes:
finished cells are skipped, the failed cell resumes from its last checkpoint.

Plug-ins: every process reads the config itself (``experiments.sweep.config.load``), which imports
the config's ``plugins`` before validating it, so each process has the same registered names.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    auto: bool,
    heartbeat_timeout: int,
) -> None:
    """Start ``jax.distributed`` (before jax touches a device) when a coordinator is given or
    ``auto``; nothing otherwise (one process)."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "--coordinator, --num-processes and --process-id go together: give all three "
            "(or --distributed to let jax find the cluster)"
        )
    if not (all(given) or auto):
        return
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )


def several() -> bool:
    return jax.process_count() > 1


def agree(value: int) -> int:
    """``value`` as process 0 has it, on every process."""
    if not several():
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def stop_everywhere(label: str, error: BaseException) -> None:
    """A cell failed in this process: say so and exit now (see the module doc)."""
    print(
        f"qjax-run: cell {label} failed in process {jax.process_index()} of {jax.process_count()}: "
        f"{type(error).__name__}: {error}\n"
        "With several processes a failed cell stops all of them (they wait on each other); fix the "
        "cause and rerun the same command on every host: finished cells are skipped and this cell "
        "resumes from its last checkpoint.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)
