"""Time a kernel's candidate block sizes on the current device, to fill ``qjax.kernels.blocks``.

``python -m experiments.tune_blocks [--kernels w8a8,fp8,w4a16] [--m 16,1024,4096] [--k 4096 --n 4096]``

For each kernel and M it times every candidate :class:`~qjax.kernels.blocks.Blocks` of
:data:`CANDIDATES` (and the table's current entry) on random data: one jitted program of
``CALLS`` back-to-back kernel calls on ``CALLS`` distinct weight copies, wall clock around
``jax.block_until_ready``, median of 5 samples after a warm-up; then prints the candidates from
fastest to slowest and the best one. Candidates that fail to compile are reported and skipped.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.kernels import blocks as kb
from qjax.kernels import fp8, w4a16, w8a8

CALLS = 8
SMALL = [
    kb.Blocks(16, 64, 128, 4, 4),
    kb.Blocks(16, 128, 128, 4, 4),
    kb.Blocks(16, 128, 256, 4, 3),
    kb.Blocks(16, 256, 128, 4, 4),
    kb.Blocks(16, 64, 256, 4, 4),
    kb.Blocks(32, 128, 128, 4, 4),
]
LARGE = [
    kb.Blocks(64, 128, 128, 4, 4),
    kb.Blocks(128, 128, 128, 8, 3),
    kb.Blocks(128, 128, 64, 4, 4),
    kb.Blocks(128, 256, 64, 8, 3),
    kb.Blocks(128, 256, 128, 8, 3),
    kb.Blocks(256, 128, 64, 8, 3),
    kb.Blocks(128, 128, 128, 4, 5),
]
CANDIDATES = {"small": SMALL, "large": LARGE}


def _operands(
    kernel: str, m: int, k: int, n: int, rng: np.random.Generator
) -> tuple[list[Any], Callable[..., Any]]:
    """``CALLS`` weight copies and the activations, and ``call(x, w, blocks)`` for the kernel."""
    if kernel == "w4a16":
        x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
        pack = jax.jit(functools.partial(w4a16.pack_w4, group_size=128))
        ws = [
            pack(
                jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.int8),
                jnp.asarray(rng.uniform(1e-3, 1e-2, (k // 128, n)), jnp.float32),
            )
            for _ in range(CALLS)
        ]
        return [x, ws], lambda x, w, b: w4a16.w4a16_matmul(x, w, blocks=b)
    if kernel == "w8a8":
        xi = (jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8), jnp.ones((m, 1), jnp.float32))
        ws = [
            (jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8), jnp.ones((1, n), jnp.float32))
            for _ in range(CALLS)
        ]
        return [xi, ws], lambda x, w, b: w8a8.w8a8_matmul(x[0], x[1], w[0], w[1], blocks=b)
    e4m3 = jnp.float8_e4m3fn
    xf = (jnp.asarray(rng.normal(size=(m, k)), e4m3), jnp.ones((m, 1), jnp.float32))
    ws = [(jnp.asarray(rng.normal(size=(k, n)), e4m3), jnp.ones((1, n), jnp.float32)) for _ in range(CALLS)]
    return [xf, ws], lambda x, w, b: fp8.fp8_matmul(x[0], x[1], w[0], w[1], blocks=b)


def time_blocks(call: Callable[..., Any], x: Any, ws: list[Any], b: kb.Blocks) -> float:
    """Median seconds per kernel call of ``CALLS`` calls in one program (see the module docstring)."""

    @jax.jit
    def program(x: Any, ws: list[Any]) -> jax.Array:
        return sum(call(x, w, b)[0, 0].astype(jnp.float32) for w in ws)  # type: ignore[return-value]

    jax.block_until_ready(program(x, ws))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(program(x, ws))
        samples.append((time.perf_counter() - t) / CALLS)
    return statistics.median(samples)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.tune_blocks", description=__doc__)
    parser.add_argument("--kernels", default="w8a8,fp8,w4a16")
    parser.add_argument("--m", default="16,1024,4096")
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args(argv)
    backend = kb.resolve_backend(None)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, backend {backend}", flush=True)
    rng = np.random.default_rng(0)
    for kernel in args.kernels.split(","):
        for m in (int(v) for v in args.m.split(",")):
            (x, ws), call = _operands(kernel, m, args.k, args.n, rng)
            table = kb.choose_blocks(kernel, backend, m)
            cands = [table] + [c for c in CANDIDATES["small" if m <= 64 else "large"] if c != table]
            rows = []
            for b in cands:
                try:
                    rows.append((time_blocks(call, x, ws, b), b))
                except Exception as e:  # a candidate that does not compile is skipped, with the reason
                    print(f"  {kernel} M={m} {b}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.sort(key=lambda r: r[0])
            flops = 2 * m * args.k * args.n
            for t, b in rows:
                mark = " (table)" if b == table else ""
                tflops = flops / t / 1e12
                print(
                    f"  {kernel} M={m} K={args.k} N={args.n} {t * 1e6:9.1f} us {tflops:7.1f} TF/s {b}{mark}"
                )
            if rows:
                print(f"BEST {kernel} M={m}: {rows[0][1]} {rows[0][0] * 1e6:.1f} us", flush=True)
            del x, ws
    return 0


if __name__ == "__main__":
    sys.exit(main())
