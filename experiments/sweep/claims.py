"""Several ``qjax-run`` processes on one output directory: who runs which cell.

A process runs a cell only while it holds the cell's claim, an exclusive lock on
``cells/<slug>/claim.lock``; a float model is trained under ``float-models/<name>.lock`` while
every other process that needs it waits, then restores the finished checkpoint. The locks are
``filelock`` locks on ``flock``: the operating system releases them when their process exits,
killed or not, so a crashed claimant never blocks a cell; the next claimant resumes it from its
last checkpoint.

A cell is *settled elsewhere* when, after this process claimed it, ``results.jsonl`` holds a
record for it that was not there when the sweep started: an ``ok`` record of the same config, or
any record another process wrote meanwhile (a failure: rerun the sweep to retry it).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import filelock

from experiments import records

logger = logging.getLogger("qjax.experiments")

CLAIM = "claim.lock"


@contextlib.contextmanager
def claim(path: pathlib.Path, *, wait: bool) -> Iterator[bool]:
    """Hold the exclusive lock ``path`` for the ``with`` block; yields False (and holds nothing)
    when another process holds it and ``wait`` is False, else waits for it and yields True. In a
    multi-process run (one cell over several processes) process 0 holds the locks for all of them:
    the others yield True and lock nothing."""
    if not records.writes():
        yield True
        return
    lock = records.file_lock(path)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@contextlib.contextmanager
def exclusive(path: pathlib.Path, what: str) -> Iterator[None]:
    """Wait for the lock ``path`` (logging that ``what`` is held by another process if it is),
    and hold it for the ``with`` block."""
    with claim(path, wait=False) as held:
        if held:
            yield
            return
    logger.info("waiting for %s: another process holds %s", what, path)
    with claim(path, wait=True):
        yield


def cell_claim_path(sweep_dir: pathlib.Path, slug: str) -> pathlib.Path:
    return sweep_dir / "cells" / slug / CLAIM


def settled_elsewhere(
    cell_hash: str, before: Mapping[str, Any] | None, now: Mapping[str, Any] | None
) -> bool:
    """Whether a claimed cell needs no run: ``now`` (its record in ``results.jsonl`` after the
    claim) is ``ok`` for ``cell_hash``, or differs from ``before`` (its record when the sweep
    started), i.e. another process ran it meanwhile."""
    if now is None:
        return False
    if now.get("status") == "ok" and now.get("hash") == cell_hash:
        return True
    return dict(now) != dict(before or {})
