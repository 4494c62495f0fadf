"""A sweep run serially against ``--workers N`` (cells as Ray tasks), in one run, and Ray's start-up.

Each run is a fresh ``qjax-run`` process on a fresh output directory (nothing shared, float models
trained in both); the ratio serial / parallel of their wall times is the number to compare (absolute
times move with the machine's load). Ray's start-up is timed on its own: ``ray.init`` of a local
instance, one no-op task, ``ray.shutdown``. Each cell runs in a Ray worker process of its own; XLA's
CPU client in each process sizes its intra-op thread pool to the machine's cores (it does not read
Ray's CPU reservation), which this script records.

Run: ``python -m experiments.scripts.bench_workers [CONFIG] [--workers 2] [--out results.json]``
(default config: ``configs/quickstart.yaml``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from experiments import records

ROOT = pathlib.Path(__file__).resolve().parents[2]


def timed_run(config: str, out: pathlib.Path, extra: Sequence[str]) -> float:
    """Wall seconds of one ``qjax-run`` process (quiet, as under CI); raises if it fails."""
    cmd = [sys.executable, "-m", "experiments.sweep.run", config, f"output_dir={out}", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, CI="true"), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def ray_startup() -> dict[str, float]:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    up = time.perf_counter()
    ray.get(ray.remote(lambda: None).remote())
    task = time.perf_counter()
    ray.shutdown()
    down = time.perf_counter()
    return {"init_s": up - start, "first_task_s": task - up, "shutdown_s": down - task}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        serial = timed_run(args.config, pathlib.Path(tmp) / "serial", [])
        parallel = timed_run(args.config, pathlib.Path(tmp) / "parallel", ["--workers", str(args.workers)])
    result: dict[str, Any] = {
        "config": args.config,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "serial_s": round(serial, 1),
        "parallel_s": round(parallel, 1),
        "speedup": round(serial / parallel, 2),
        "ray": {k: round(v, 2) for k, v in ray_startup().items()},
        "intra_op_threads_per_cell": f"XLA's default: one pool per process of {os.cpu_count()} threads",
    }
    rows = [
        {"run": "serial", "s": result["serial_s"]},
        {"run": f"--workers {args.workers}", "s": result["parallel_s"]},
    ]
    print(records.markdown_table(rows, [("run", "run", ""), ("wall s", "s", ".1f")]))
    print(f"speedup {result['speedup']}x on {result['cpus']} CPUs; Ray start-up {result['ray']}")
    if args.out:
        records.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
