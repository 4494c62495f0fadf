"""Results files and the protocol every result records.

Every file is written atomically: to a temporary file in the same directory, flushed and
``fsync``-ed, then ``os.replace``-d over the target, so a killed run leaves either the old file or
the new one, never half of one; in a run of several processes, process 0 alone writes.
``results.jsonl`` holds one JSON line per finished cell and is rewritten whole (atomically) when a
cell finishes, under ``results.jsonl.lock`` so that processes sharing a sweep directory never lose
each other's records.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import filelock
import flax
import jax
import optax

import qjax

RESULTS = "results.jsonl"


def writes() -> bool:
    """Whether this process writes results files: the only one, or process 0 of a multi-process
    (``jax.distributed``) run."""
    return jax.process_index() == 0


def write_atomic(path: pathlib.Path, text: str | bytes) -> None:
    """Write ``text`` (str or bytes) to ``path`` so that readers see the old or the new content,
    nothing between (a temporary file in the same directory, ``fsync``, ``os.replace``). In a
    multi-process run only process 0 writes (:func:`writes`); on the others this does nothing."""
    if not writes():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    data = text.encode() if isinstance(text, str) else text
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def finite(payload: Any) -> Any:
    """``payload`` with every non-finite float (NaN, +-Inf) replaced by ``None``: JSON has no NaN
    (Python's ``NaN`` token is not JSON), so records say ``null`` and their status says why."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, Mapping):
        return {k: finite(v) for k, v in payload.items()}
    if isinstance(payload, list | tuple):
        return [finite(v) for v in payload]
    return payload


def to_json(payload: Any, **kwargs: Any) -> str:
    """Strict JSON of ``payload`` (non-finite floats as ``null``, keys sorted)."""
    return json.dumps(finite(payload), sort_keys=True, default=str, allow_nan=False, **kwargs)


def write_json(path: pathlib.Path, payload: Any) -> None:
    write_atomic(path, to_json(payload, indent=1) + "\n")


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A GitHub markdown table of ``rows``: one column per ``(header, key, format spec)``, e.g.
    ``("q+dq ms", "qdq_ms", ".1f")``; the first column (the label) left-aligned, the rest right."""
    header = [h for h, _, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(format(r[key], spec) for _, key, spec in columns) + " |" for r in rows]
    return "\n".join(lines)


class ResultsError(ValueError):
    """``results.jsonl`` holds a line that is not a record."""


def read_results(sweep_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The records of ``results.jsonl`` (empty if there is none yet). A line that is not a JSON
    object with a ``cell`` raises :class:`ResultsError` naming the file, the line and the repair;
    nothing is skipped (the next write would drop it)."""
    path = sweep_dir / RESULTS
    if not path.exists():
        return []
    repair = (
        f"fix or delete that line of {path} (a finished cell's record is also in its "
        "cells/<slug>/metrics.json, and qjax-run adds a missing record back from there)"
    )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        at = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ResultsError(f"{path}:{at}: not UTF-8 text ({e.reason}); {repair}") from None
    results = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}:{i}: not a JSON record ({e}); {repair}") from None
        if not isinstance(record, dict) or "cell" not in record:
            what = f"{line[:60]!r} is not a record (a JSON object with a 'cell')"
            raise ResultsError(f"{path}:{i}: {what}; {repair}")
        results.append(record)
    return results


def write_results(sweep_dir: pathlib.Path, records: Iterable[Mapping[str, Any]]) -> None:
    lines = [to_json(r) for r in records]
    write_atomic(sweep_dir / RESULTS, "".join(line + "\n" for line in lines))


def upsert_result(sweep_dir: pathlib.Path, record: Mapping[str, Any]) -> None:
    """Add ``record``, replacing an earlier record of the same cell (a failed one being retried)."""
    with results_lock(sweep_dir):
        records = [r for r in read_results(sweep_dir) if r.get("cell") != record["cell"]]
        write_results(sweep_dir, [*records, record])


def file_lock(path: pathlib.Path) -> filelock.BaseFileLock:
    """An exclusive inter-process lock on the file ``path`` (``flock``: the operating system
    releases it when its process exits, killed or not)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the lock file stays: removing it on release races with a process about to lock it
    return filelock.FileLock(path, preserve_lock_file=True)


def results_lock(sweep_dir: pathlib.Path) -> filelock.BaseFileLock:
    """The lock that every read-modify-write of ``results.jsonl`` holds."""
    return file_lock(sweep_dir / f"{RESULTS}.lock")


def git_commit() -> str:
    """The commit of the qjax checkout (with ``-dirty`` when it has uncommitted changes)."""
    root = pathlib.Path(qjax.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Versions and the devices jax sees: the part of the protocol that is the same for every cell of
    a run (each cell adds ``device``, the devices that held its model)."""
    device = jax.devices()[0]
    return {
        "git_commit": git_commit(),
        "qjax": qjax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "host_devices": f"{device.platform}: {device.device_kind} x{jax.device_count()}",
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
