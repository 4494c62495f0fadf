"""Time a kernel's candidate block sizes on the current device, to fill ``qjax.kernels.tuning``.

``python -m experiments.kernels.tune [--kernels w8a8,fp8,w4a16] [--m 16,1024,4096] [--k 4096 --n 4096]``

For each kernel and M it times every candidate :class:`~qjax.kernels.blocks.Blocks` of
:data:`CANDIDATES` (and the table's current entry) on random data; for ``w8a8-mgpu`` and
``fp8-mgpu`` (the experimental Hopper kernels, :mod:`qjax.kernels.experimental.hopper`, weight
prepared ``(N, K)`` once) every :class:`~qjax.kernels.experimental.hopper.HopperConfig` of
:data:`HOPPER_CANDIDATES`, and XLA's bf16 matmul of the same shape as a yardstick; ``w8a8-nk`` and
``fp8-nk`` time the experimental Triton kernels with the weight stored ``(N, K)``
(:mod:`qjax.kernels.experimental.nk_layout`) on the same candidates. ``w8a8-xla`` and ``fp8-xla`` have no
blocks: they time XLA's native int8 / fp8 dot (``qjax.kernels.xla.contract``, what serving with
``kernels="xla"`` runs) with the weight stored ``(K, N)`` and stored ``(N, K)``, the two "candidates"
``XLA (K, N)`` and ``XLA (N, K)``. Each is timed as one jitted program of ``CALLS`` back-to-back
kernel calls on ``CALLS`` distinct weight copies, median of 5 samples after a warm-up, on the clock
of ``--clock`` (:mod:`experiments.kernels.timing`: by default CUPTI's kernel durations on a GPU, the wall
clock elsewhere); then prints the candidates from fastest to slowest and the best one. Candidates
that fail to compile are reported and skipped.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.kernels import timing
from qjax.kernels import fp8, tuning, w4a16, w8a8, xla
from qjax.kernels.backend import resolve_backend
from qjax.kernels.experimental import hopper, nk_layout

CALLS = 8


# (block_m, block_n, block_k, num_warps, num_stages) by the size of M: small (<= 64) and large; the
# last large one has wide tiles for wgmma (the K-major "-nk" layouts)
# fmt: off
_SMALL = ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 128, 256, 4, 3), (16, 256, 128, 4, 4),
          (16, 64, 256, 4, 4), (32, 128, 128, 4, 4))
_LARGE = ((64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
          (128, 256, 128, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 4, 5), (128, 256, 128, 8, 4))
# fmt: on
CANDIDATES = {"small": [tuning.Blocks(*b) for b in _SMALL], "large": [tuning.Blocks(*b) for b in _LARGE]}
H = hopper.HopperConfig
HOPPER_CANDIDATES = {
    "small": [H(64, 128, 128, 4), H(64, 64, 128, 4), H(64, 128, 256, 2), H(64, 256, 128, 2)],
    "large": [
        H(128, 128, 128, 4, 8),
        H(128, 128, 128, 4, 4),
        H(128, 128, 128, 4, 16),
        H(128, 128, 128, 3, 8),
        H(128, 128, 256, 2, 8),
        H(128, 192, 128, 3, 8, epi_tile_n=32),
        H(64, 256, 128, 2, 8),
        H(128, 128, 128, 3, 8, epi_tile_n=128),
    ],
}
MOSAIC_GPU = {"w8a8-mgpu": jnp.int32, "fp8-mgpu": jnp.float32}  # kernel -> accumulator
XLA_DOTS = {"w8a8-xla": jnp.int8, "fp8-xla": jnp.float8_e4m3fn}  # kernel -> operand dtype
# The "candidates" of the XLA dots: where the weight is stored, and the dimension numbers reading it
XLA_LAYOUTS = {"XLA (K, N)": (((1,), (0,)), ((), ())), "XLA (N, K)": (((1,), (1,)), ((), ()))}


def _codes(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Random int8 codes on [-127, 127], or e4m3 values of normal samples."""
    values = rng.integers(-127, 128, shape) if dtype == jnp.int8 else rng.normal(size=shape)
    return jnp.asarray(values, dtype)


def operands(
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
    if kernel == "bf16":
        xb = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
        ws = [jnp.asarray(rng.normal(size=(k, n)), jnp.bfloat16) for _ in range(CALLS)]
        return [xb, ws], lambda x, w, b: jnp.dot(x, w)
    if kernel in XLA_DOTS:  # each weight copy stored both ways; the candidate picks one
        dtype = XLA_DOTS[kernel]
        xq = xla.Operand(_codes(rng, (m, k), dtype), None, jnp.ones((m, 1), jnp.float32))
        wq = [_codes(rng, (k, n), dtype) for _ in range(CALLS)]
        wsx = [
            {
                "XLA (K, N)": xla.Operand(w, None, jnp.ones((1, n), jnp.float32)),
                "XLA (N, K)": xla.Operand(w.T, None, jnp.ones((n, 1), jnp.float32)),
            }
            for w in wq
        ]
        return [xq, wsx], lambda x, w, b: xla.contract(x, w[b], XLA_LAYOUTS[b]).astype(jnp.bfloat16)
    if kernel in MOSAIC_GPU:
        dtype = jnp.int8 if kernel.startswith("w8a8") else jnp.float8_e4m3fn
        xh = (_codes(rng, (m, k), dtype), jnp.ones((m, 1), jnp.float32))
        prep = jax.jit(hopper.prepare_weight)
        wsh = [
            (prep(jnp.asarray(rng.integers(-127, 128, (k, n)), dtype)), jnp.ones((1, n), jnp.float32))
            for _ in range(CALLS)
        ]

        def hopper_call(x: Any, w: Any, b: Any) -> jax.Array:
            epi = {"x_scale": x[1], "w_scale": w[1]}
            return hopper.scaled_matmul_hopper(
                x[0], w[0], epi, n=n, acc_dtype=MOSAIC_GPU[kernel], out_dtype=jnp.bfloat16, config=b
            )

        return [xh, wsh], hopper_call
    nk = kernel.endswith("-nk")  # the weight stored (N, K): the experimental *_nk kernels
    shape = (n, k) if nk else (k, n)
    matmul: Callable[..., jax.Array]
    if kernel.startswith("w8a8"):
        dtype, matmul = jnp.int8, nk_layout.w8a8_matmul_nk if nk else w8a8.w8a8_matmul
    else:
        dtype, matmul = jnp.float8_e4m3fn, nk_layout.fp8_matmul_nk if nk else fp8.fp8_matmul
    xi = (_codes(rng, (m, k), dtype), jnp.ones((m, 1), jnp.float32))
    ws = [(_codes(rng, shape, dtype), jnp.ones((1, n), jnp.float32)) for _ in range(CALLS)]
    return [xi, ws], lambda x, w, b: matmul(x[0], x[1], w[0], w[1], blocks=b)


def time_blocks(call: Callable[..., Any], x: Any, ws: list[Any], b: Any, clock: str = "wall") -> float:
    """Median seconds per kernel call of ``CALLS`` calls in one program (see the module docstring)."""

    def program(x: Any, ws: list[Any]) -> jax.Array:
        return sum(call(x, w, b)[0, 0].astype(jnp.float32) for w in ws)  # type: ignore[return-value]

    compiled = jax.jit(program).lower(x, ws).compile()
    return timing.time_program(clock, compiled, (x, ws), len(ws), 5).seconds


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m experiments.kernels.tune``."""
    parser = argparse.ArgumentParser(prog="python -m experiments.kernels.tune", description=__doc__)
    parser.add_argument(
        "--kernels",
        default="w8a8,fp8,w4a16",
        help=(
            "of w8a8, fp8, w4a16, w8a8-nk, fp8-nk (weight (N, K)), w8a8-mgpu, fp8-mgpu, bf16 (XLA), "
            "w8a8-xla, fp8-xla (XLA's int8 / fp8 dot, weight (K, N) and (N, K))"
        ),
    )
    parser.add_argument("--m", default="16,1024,4096")
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    timing.add_clock_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    backend = resolve_backend(None)
    clock, clock_note = timing.resolve_clock(args.clock, parser.error)
    print(
        f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, backend {backend}; clock: "
        + timing.describe(clock, clock_note),
        flush=True,
    )
    rng = np.random.default_rng(0)
    for kernel in args.kernels.split(","):
        for m in (int(v) for v in args.m.split(",")):
            (x, ws), call = operands(kernel, m, args.k, args.n, rng)
            size = "small" if m <= 64 else "large"
            cands: list[Any]
            table: Any
            if kernel == "bf16":
                table, cands = None, [None]
            elif kernel in XLA_DOTS:
                table, cands = None, list(XLA_LAYOUTS)
            elif kernel in MOSAIC_GPU:
                table = hopper.choose_config(m)
                cands = [table] + [c for c in HOPPER_CANDIDATES[size] if c != table]
            else:
                base = kernel.removesuffix("-nk")  # the weight layout shares the kernel's table
                table = tuning.choose_blocks(base, backend, m)
                key = tuning.table_key(base, backend)
                print(f"  {kernel} M={m}: table entry BLOCK_TABLE[{key}]", flush=True)
                cands = [table] + [c for c in CANDIDATES[size] if c != table]
            rows = []
            for b in cands:
                try:
                    rows.append((time_blocks(call, x, ws, b, clock), b))
                except Exception as e:  # a candidate that does not compile is skipped, with the reason
                    print(f"  {kernel} M={m} {b}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.sort(key=lambda r: r[0])
            flops = 2 * m * args.k * args.n
            for t, b in rows:
                mark = " (table)" if b == table and b is not None else ""
                tflops = flops / t / 1e12
                print(
                    f"  {kernel} M={m} K={args.k} N={args.n} {t * 1e6:9.1f} us {tflops:7.1f} TF/s "
                    f"{b or 'XLA'}{mark}"
                )
            if rows:
                print(f"BEST {kernel} M={m}: {rows[0][1] or 'XLA'} {rows[0][0] * 1e6:.1f} us", flush=True)
            del x, ws
    return 0


if __name__ == "__main__":
    sys.exit(main())
