"""Helpers for tests that start processes: bounded in time, always reaped."""

import os
import subprocess
import sys
from collections.abc import Sequence

from tests import ROOT


def run_together(commands: Sequence[Sequence[str]], *, timeout: float, env: dict | None = None) -> list:
    """Start every command at once (cwd: the repository root), wait for all of them, kill any left
    on error or timeout; returns ``(returncode, stdout + stderr)`` for each."""
    procs = [
        subprocess.Popen(
            list(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in commands
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


def run_multidevice_tests(test_files: Sequence[str], passed: int, devices: int = 8) -> None:
    """Run the ``test_multidevice_*`` tests of ``test_files`` in one pytest process with ``devices``
    simulated CPU devices (``tests/conftest.py`` deselects them in a process with fewer) and
    require ``passed`` of them to pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "multidevice", *test_files]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert f"{passed} passed" in done.stdout, done.stdout[-3000:]
