"""Checksums of checkpoint files: sealed after a save, verified before a restore.

A checkpoint step directory ``<dir>/<step>/`` holds orbax's files; :func:`seal` adds
``qjax_checksums.json``: for every other file, its path relative to the step directory, its size
and its SHA-256. :func:`verify` recomputes them and names the first file that is missing, has
another size or another checksum. A step without the file (its save was interrupted between
orbax's final rename and the seal, or it was written before checksums existed) cannot be verified:
:func:`verify` says so and the caller decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

MANIFEST = "qjax_checksums.json"
UNSEALED = "it has no checksums"
_CHUNK = 1 << 20


def file_digest(path: pathlib.Path) -> str:
    """The SHA-256 of the file ``path`` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def seal(step_dir: pathlib.Path) -> None:
    """Write ``step_dir/qjax_checksums.json`` (atomically) for the files ``step_dir`` holds now."""
    entries = {
        p.relative_to(step_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in _files(step_dir)
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=step_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "files": entries}, f, indent=0, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, step_dir / MANIFEST)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def verify(step_dir: pathlib.Path) -> str | None:
    """``None`` if every file sealed in ``step_dir`` is there with its size and checksum, else what
    is wrong (:data:`UNSEALED` if there are no checksums to check)."""
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        entries = manifest["files"]
    except FileNotFoundError:
        return UNSEALED
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksum file {MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, entry in sorted(entries.items()):
        path = step_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"file {name} is missing"
        if size != entry["bytes"]:
            return f"file {name} has {size} bytes, {entry['bytes']} when saved"
        if file_digest(path) != entry["sha256"]:
            return f"file {name} does not match its checksum (its bytes changed since the save)"
    return None


__all__ = ["MANIFEST", "UNSEALED", "file_digest", "seal", "verify"]
