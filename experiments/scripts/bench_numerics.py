"""Throughput of quantize + dequantize next to a plain copy of the same array, in one run.

For a 4096 x 4096 float32 array, each jitted function reads the array once and writes an array of
the same size, so effective bandwidth is ``2 * nbytes / time`` for all of them; the ratio to the
copy measured in the same run is the number to compare across machines (absolute GB/s move with
the machine's load). "Simulated" is ``quantize_dequantize`` (fake quantization, nothing stored
or packed). Times are medians of repeated runs after a warm-up, with
``block_until_ready``.

Run: ``python -m experiments.scripts.bench_numerics [--size 4096] [--repeats 20] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import qjax
from experiments import records

CASES: tuple[tuple[str, dict[str, object]], ...] = (
    ("int8 per-tensor", dict(dtype="int8")),
    ("int8 per-channel", dict(dtype="int8", granularity="per_channel", axis=-1)),
    ("int8 per-group 128", dict(dtype="int8", granularity="per_group", axis=0, group_size=128)),
    ("int4 per-tensor", dict(dtype="int4")),
    ("int4 per-channel", dict(dtype="int4", granularity="per_channel", axis=-1)),
    ("int4 per-group 128", dict(dtype="int4", granularity="per_group", axis=0, group_size=128)),
)


def median_seconds(fn: Callable[[jax.Array], jax.Array], x: jax.Array, repeats: int) -> float:
    jax.block_until_ready(fn(x))  # compile and warm up
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(size: int, repeats: int) -> list[dict[str, object]]:
    x = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    gbytes = 2 * x.nbytes / 1e9
    copy = jax.jit(jnp.copy)  # an XLA copy: one read, one write
    results: list[dict[str, object]] = []
    for name, fields in CASES:
        spec = qjax.QuantSpec(**fields)  # type: ignore[arg-type]
        qdq = jax.jit(lambda a, spec=spec: qjax.dequantize(qjax.quantize(a, spec)))
        simulated = jax.jit(lambda a, spec=spec: qjax.quantize_dequantize(a, spec))
        t_copy = median_seconds(copy, x, repeats)  # re-measured beside each case: shared machines drift
        t_qdq = median_seconds(qdq, x, repeats)
        t_sim = median_seconds(simulated, x, repeats)
        results.append(
            {
                "case": name,
                "qdq_ms": 1e3 * t_qdq,
                "copy_ms": 1e3 * t_copy,
                "qdq_gb_s": gbytes / t_qdq,
                "copy_gb_s": gbytes / t_copy,
                "copy_over_qdq": t_copy / t_qdq,
                "simulated_ms": 1e3 * t_sim,
                "copy_over_simulated": t_copy / t_sim,
            }
        )
    return results


COLUMNS = (  # (header, result key, format)
    ("case", "case", "s"),
    ("q+dq ms", "qdq_ms", ".1f"),
    ("q+dq GB/s", "qdq_gb_s", ".2f"),
    ("copy GB/s", "copy_gb_s", ".2f"),
    ("q+dq / copy throughput", "copy_over_qdq", ".3f"),
    ("simulated / copy throughput", "copy_over_simulated", ".3f"),
)


def to_markdown(results: Sequence[dict[str, Any]]) -> str:
    return records.markdown_table(results, COLUMNS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, help="write the full results as JSON here")
    args = parser.parse_args(argv)
    results = run(args.size, args.repeats)
    device = jax.devices()[0]
    where = f"{device.platform} ({device.device_kind}), jax {jax.__version__}"
    print(f"{args.size}x{args.size} float32 on {where}")
    print(to_markdown(results))
    if args.out:
        records.write_json(
            args.out, {"device": str(device.device_kind), "size": args.size, "results": results}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
