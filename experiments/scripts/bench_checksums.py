"""The cost of checkpoint checksums (``qjax.training.integrity``) next to the save and the restore
they guard, measured in one run.

For each model size, a model and its Adam state are saved ``--repeats`` times with
``TrainingCheckpointer.save`` (orbax's save, then the seal: SHA-256 of every file written); the
seal is then timed again on its own on the same step directory, and ``verify`` against a restore.
The numbers to read are the ratios seal / orbax save and verify / restore (medians): absolute times
move with the machine's load and disk.

Run: ``python -m experiments.scripts.bench_checksums [--repeats 5] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time
from typing import Any

import flax.nnx as nnx
import optax

from experiments import records
from qjax import training
from qjax.training import integrity


class Wide(nnx.Module):
    """``layers`` square Linear layers of width ``width``."""

    def __init__(self, width: int, layers: int, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(layers)])


def measure(width: int, layers: int, repeats: int, root: pathlib.Path) -> dict[str, Any]:
    model = Wide(width, layers, nnx.Rngs(0))
    optimizer = training.make_optimizer(model, optax.adam(1e-3))
    total, seal, verify, restore = [], [], [], []
    with training.TrainingCheckpointer(root / f"w{width}", keep=2) as ckpt:
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            ckpt.save(step, model, optimizer)
            total.append(time.perf_counter() - start)
            step_dir = ckpt.directory / str(step)
            start = time.perf_counter()
            integrity.seal(step_dir)
            seal.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert integrity.verify(step_dir) is None
            verify.append(time.perf_counter() - start)
            start = time.perf_counter()
            ckpt.restore(model, optimizer, step=step)  # verifies too: subtract it
            restore.append(time.perf_counter() - start - verify[-1])
        size = ckpt.step_bytes(repeats)
    save = [t - s for t, s in zip(total, seal, strict=True)]
    med = statistics.median
    return {
        "width": width,
        "layers": layers,
        "checkpoint_mb": round(size / 2**20, 1),
        "orbax_save_s": round(med(save), 4),
        "seal_s": round(med(seal), 4),
        "seal_over_save": round(med(seal) / med(save), 3),
        "restore_s": round(med(restore), 4),
        "verify_s": round(med(verify), 4),
        "verify_over_restore": round(med(verify) / med(restore), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, layers in ((256, 4), (1024, 4), (2048, 4)):
            rows.append(measure(width, layers, args.repeats, pathlib.Path(tmp)))
            print(rows[-1], flush=True)
    columns = [
        ("checkpoint MB", "checkpoint_mb", ".1f"),
        ("orbax save s", "orbax_save_s", ".4f"),
        ("seal s", "seal_s", ".4f"),
        ("seal / save", "seal_over_save", ".3f"),
        ("restore s", "restore_s", ".4f"),
        ("verify s", "verify_s", ".4f"),
        ("verify / restore", "verify_over_restore", ".3f"),
    ]
    print(records.markdown_table(rows, columns))
    if args.out is not None:
        host = records.environment()["host"]
        records.write_json(args.out, {"repeats": args.repeats, "rows": rows, "host": host})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
