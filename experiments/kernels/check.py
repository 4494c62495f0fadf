"""Every Pallas kernel against its pure-jnp reference on the current device, in one short run.

``python -m experiments.kernels.check [--backend gpu|tpu|interpret] [--out check.json]``

The unit tests (``tests/kernels``) check the kernels in the Pallas interpreter on CPU and their
lowering for ``cuda`` and ``tpu``; this script is the check on a real accelerator, where Triton or
Mosaic compile the kernels: int8 exactness of the W8A8 accumulator, the W8A8 / FP8 / W4A16 outputs
within float rounding of their references, and the per-token quantization bit for bit, at decode
(M = 1), odd and Llama-sized shapes, W8A8 / int8 / FP8 / block-scaled FP8 also with K split in
three ranges of unequal length (``split_k=3``; the default splits K at M = 1 and 16 on a GPU). It
checks the experimental kernels too (``qjax.kernels.experimental``): the weight stored ``(N, K)``
(the ``*_nk`` kernels), and on a GPU the W8A8, int8 and FP8 Hopper kernels (``[mosaic_gpu]``, sm_90
only), the Hopper W4A16 kernel and the W4A16 options that ``experiments.kernels.profile_w4a16``
times (``unpack="asm"``, ``swap_ab``). It runs shape by shape (every case at the first shape, then
the next), prints one line per case and exits non-zero if any case fails (compile errors
included); ``--time-budget-s`` stops it before a case once spent.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import pathlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.records import write_json
from qjax.kernels import act_quant, fp8, fp8_block, tuning, w4a16, w8a8
from qjax.kernels.backend import resolve_backend
from qjax.kernels.common import KN
from qjax.kernels.experimental import hopper, hopper_w4, nk_layout, w4a16_variants

SHAPES = ((1, 4096, 4096), (16, 4096, 12288), (33, 200, 130), (1024, 4096, 4096))


def _rel(y: jax.Array, r: jax.Array) -> float:
    y64, r64 = np.asarray(y, np.float64), np.asarray(r, np.float64)
    return float(np.max(np.abs(y64 - r64)) / (np.max(np.abs(r64)) + 1e-30))


def _int8(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)


def _layout(w: jax.Array, w_layout: str) -> jax.Array:
    """The ``(K, N)`` weight as the kernel takes it with ``w_layout``: transposed for ``"nk"``."""
    return w.T if w_layout == "nk" else w


Error = tuple[float, float]  # (error, tolerance) of a case


class Variant(NamedTuple):
    """How a W8A8 / int8 / FP8 / block-scaled FP8 case calls its kernel: the weight's layout
    (``"nk"``: the experimental ``*_nk`` kernel) and the K ranges (``None``: the kernel's default)."""

    w_layout: str = "kn"
    split_k: int | None = None

    def split(self, kernel: str, backend: str, m: int, k: int) -> int | None:
        """``split_k``, or the K steps of the kernel's blocks if there are fewer (a short K)."""
        if self.split_k is None:
            return None
        bk = fp8_block.GROUP if kernel == "fp8_block" else tuning.choose_blocks(kernel, backend, m).block_k
        return min(self.split_k, -(-k // bk))


PLAIN = Variant()
# case kernel -> (its block table entry, the main kernel, the (N, K) kernel, the Hopper kernel)
KERNELS: dict[str, tuple[str, Callable[..., Any], Callable[..., Any], Callable[..., Any] | None]] = {
    "int8": ("w8a8", w8a8.int8_matmul, nk_layout.int8_matmul_nk, hopper.int8_matmul_hopper),
    "w8a8": ("w8a8", w8a8.w8a8_matmul, nk_layout.w8a8_matmul_nk, hopper.w8a8_matmul_hopper),
    "fp8": ("fp8", fp8.fp8_matmul, nk_layout.fp8_matmul_nk, hopper.fp8_matmul_hopper),
    "fp8_block": ("fp8_block", fp8_block.fp8_block_matmul, nk_layout.fp8_block_matmul_nk, None),
}


def kernel_call(kernel: str, backend: str, v: Variant, m: int, k: int, **kw: Any) -> Callable[..., Any]:
    """The jitted call of a case: the main kernel on ``backend``, its ``(N, K)`` variant, or on
    ``backend="mosaic_gpu"`` the experimental Hopper kernel (the weight in the variant's layout)."""
    table, main, nk, on_hopper = KERNELS[kernel]
    if backend == "mosaic_gpu" and on_hopper is not None:
        layout = nk_layout.NK if v.w_layout == "nk" else KN
        return jax.jit(functools.partial(on_hopper, layout=layout, **kw))
    fn = nk if v.w_layout == "nk" else main
    return jax.jit(functools.partial(fn, backend=backend, split_k=v.split(table, backend, m, k), **kw))


def case_int8(rng: np.random.Generator, m: int, k: int, n: int, backend: str, v: Variant = PLAIN) -> Error:
    x, w = _int8(rng, m, k), _int8(rng, k, n)
    y = kernel_call("int8", backend, v, m, k)(x, _layout(w, v.w_layout))
    return float(np.max(np.abs(np.asarray(y, np.int64) - np.asarray(w8a8.int8_matmul_reference(x, w))))), 0.0


def case_w8a8(rng: np.random.Generator, m: int, k: int, n: int, backend: str, v: Variant = PLAIN) -> Error:
    x, w = _int8(rng, m, k), _int8(rng, k, n)
    xs = jnp.asarray(rng.uniform(1e-3, 1e-2, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1e-2, (1, n)), jnp.float32)
    zp = jnp.asarray(rng.integers(-20, 20, (m, 1)), jnp.int32)
    bias = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    kw: dict[str, Any] = dict(x_zero_point=zp, bias=bias, out_dtype=jnp.float32)
    y = kernel_call("w8a8", backend, v, m, k, **kw)(x, xs, _layout(w, v.w_layout), ws)
    return _rel(y, w8a8.w8a8_matmul_reference(x, xs, w, ws, **kw)), 1e-5


def case_fp8(rng: np.random.Generator, m: int, k: int, n: int, backend: str, v: Variant = PLAIN) -> Error:
    e4m3 = jnp.float8_e4m3fn
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32).astype(e4m3)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32).astype(e4m3)
    xs = jnp.asarray(rng.uniform(0.5, 2, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(0.5, 2, (1, n)), jnp.float32)
    y = kernel_call("fp8", backend, v, m, k, out_dtype=jnp.float32)(x, xs, _layout(w, v.w_layout), ws)
    return _rel(y, fp8.fp8_matmul_reference(x, xs, w, ws, out_dtype=jnp.float32)), 2e-3


def case_fp8_block(
    rng: np.random.Generator, m: int, k: int, n: int, backend: str, v: Variant = PLAIN
) -> Error:
    e4m3 = jnp.float8_e4m3fn
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32).astype(e4m3)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32).astype(e4m3)
    xs = jnp.asarray(rng.uniform(0.5, 2, (m, -(-k // 128))), jnp.float32)
    ws = jnp.asarray(rng.uniform(0.5, 2, (-(-k // 128), -(-n // 128))), jnp.float32)
    y = kernel_call("fp8_block", backend, v, m, k, out_dtype=jnp.float32)(x, xs, _layout(w, v.w_layout), ws)
    return _rel(y, fp8_block.fp8_block_matmul_reference(x, xs, w, ws, out_dtype=jnp.float32)), 2e-3


def case_w4a16(
    rng: np.random.Generator, m: int, k: int, n: int, backend: str, hopper: bool = False, **options: Any
) -> tuple[float, float]:
    """Asymmetric int4 weights, group 128 where it divides K, else the smallest group the kernel takes
    (32; 64 for the Hopper kernel, ``qjax.kernels.experimental.hopper_w4``), K cut to a multiple of
    it. ``options`` (``unpack``, ``swap_ab``) go to the experimental
    ``qjax.kernels.experimental.w4a16_variants.w4a16_matmul_variant``."""
    sizes = (128, 64) if hopper else (128, 32)
    g = next((size for size in sizes if k % size == 0), sizes[-1])
    k -= k % g
    q = jnp.asarray(rng.integers(0, 16, (k, n)), jnp.int8)
    s = jnp.asarray(rng.uniform(1e-3, 2e-2, (k // g, n)), jnp.float32)
    z = jnp.asarray(rng.integers(0, 16, (k // g, n)), jnp.float32)
    packed = jax.jit(functools.partial(w4a16.pack_w4, group_size=g))(q, s, z)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    if hopper:
        f = functools.partial(hopper_w4.w4a16_matmul_hopper, out_dtype=jnp.float32, **options)
        y = jax.jit(f)(x, hopper_w4.prepare_w4(packed))
    else:
        matmul = w4a16_variants.w4a16_matmul_variant if options else w4a16.w4a16_matmul
        f = functools.partial(matmul, backend=backend, out_dtype=jnp.float32, **options)
        y = jax.jit(f)(x, packed)
    return _rel(y, w4a16.w4a16_matmul_reference(x, packed, out_dtype=jnp.float32)), 1e-2


def case_act_quant(rng: np.random.Generator, m: int, k: int, n: int, backend: str) -> tuple[float, float]:
    x = jnp.asarray(rng.normal(size=(m, k)) * rng.uniform(1e-3, 1e3, (m, 1)), jnp.bfloat16)
    x = x.at[0].set(0)  # an all-zero row
    worst = 0.0
    for dtype in (jnp.int8, jnp.float8_e4m3fn):
        q, s = jax.jit(functools.partial(act_quant.quantize_per_token, dtype=dtype, backend=backend))(x)
        qr, sr = act_quant.quantize_per_token_reference(x, dtype=dtype)
        q32, qr32 = np.asarray(q.astype(jnp.float32)), np.asarray(qr.astype(jnp.float32))
        codes = q32 != qr32
        scale_rows = np.flatnonzero(np.asarray(s) != np.asarray(sr))
        if codes.any() or scale_rows.size:
            r, c = np.argwhere(codes)[0] if codes.any() else (scale_rows[0], 0)
            print(
                f"    {jnp.dtype(dtype).name}: {int(codes.sum())} codes differ (first at row {r} col {c}: "
                f"x={float(x[r, c])!r} kernel {q32[r, c]} reference {qr32[r, c]}, scale kernel "
                f"{float(s[r, 0])!r} reference {float(sr[r, 0])!r}); {scale_rows.size} scales differ",
                flush=True,
            )
        worst = max(worst, float(codes.mean()), float(np.max(np.abs(np.asarray(s) - np.asarray(sr)))))
    return worst, 0.0


CASES: dict[str, Callable[..., tuple[float, float]]] = {
    "int8_matmul (int32 exact)": case_int8,
    "w8a8_matmul (zero point, bias)": case_w8a8,
    "fp8_matmul": case_fp8,
    # the weight stored (N, K), K contiguous: the operand Hopper's 8-bit wgmma reads
    "int8_matmul (int32 exact) [w_layout=nk]": functools.partial(case_int8, v=Variant("nk")),
    "w8a8_matmul (zero point, bias) [w_layout=nk]": functools.partial(case_w8a8, v=Variant("nk")),
    "fp8_matmul [w_layout=nk]": functools.partial(case_fp8, v=Variant("nk")),
    "fp8_block_matmul [w_layout=nk]": functools.partial(case_fp8_block, v=Variant("nk")),
    "fp8_block_matmul (128 x 128 blocks)": case_fp8_block,
    # K in 3 ranges of unequal length (the last one shorter), partial sums added by XLA; at M = 1
    # and 16 the default splits K too (split_k=None fills the GPU), evenly
    "int8_matmul (int32 exact) [split_k=3]": functools.partial(case_int8, v=Variant(split_k=3)),
    "w8a8_matmul (zero point, bias) [split_k=3]": functools.partial(case_w8a8, v=Variant(split_k=3)),
    "fp8_matmul [w_layout=nk, split_k=3]": functools.partial(case_fp8, v=Variant("nk", 3)),
    "fp8_block_matmul [split_k=3]": functools.partial(case_fp8_block, v=Variant(split_k=3)),
    "w4a16_matmul (asym, g128/g32)": case_w4a16,
    "quantize_per_token (int8, fp8)": case_act_quant,
}
# The Hopper kernels (qjax.kernels.experimental.hopper, Pallas on Mosaic GPU), checked when the backend
# is "gpu".
MOSAIC_GPU_CASES = ("int8_matmul (int32 exact)", "w8a8_matmul (zero point, bias)", "fp8_matmul")
# W4A16 options timed by experiments.kernels.profile_w4a16, checked when the backend is "gpu" (the PTX unpack
# runs nowhere else).
W4A16_GPU_CASES: dict[str, Callable[..., tuple[float, float]]] = {
    "w4a16_matmul (asym) [unpack=asm]": functools.partial(case_w4a16, unpack="asm"),
    "w4a16_matmul (asym) [swap_ab]": functools.partial(case_w4a16, swap_ab=True),
    "w4a16_matmul_hopper (asym) [mosaic_gpu]": functools.partial(case_w4a16, hopper=True),
}
CASE_MAX_M = {"w4a16_matmul_hopper (asym) [mosaic_gpu]": hopper_w4.MAX_M}  # small-M kernels


def planned_runs(backend: str) -> list[tuple[str, Callable[..., tuple[float, float]], str]]:
    """``(name, case, backend)`` of every case run on ``backend``."""
    runs = [(name, case, backend) for name, case in CASES.items()]
    if backend == "gpu":
        runs += [(f"{name} [mosaic_gpu]", CASES[name], "mosaic_gpu") for name in MOSAIC_GPU_CASES]
        runs += [(name, case, "gpu") for name, case in W4A16_GPU_CASES.items()]
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.kernels.check", description=__doc__)
    parser.add_argument("--backend", default=None, help="gpu, tpu or interpret (default: the device's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--shapes", default=None, help="e.g. 1x64x128,16x256x384 (MxKxN)")
    parser.add_argument(
        "--time-budget-s", type=float, default=None, help="stop before a case once this much time has passed"
    )
    args = parser.parse_args(argv)
    backend = resolve_backend(args.backend)
    shapes = (
        SHAPES if args.shapes is None else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    )
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, backend {backend}", flush=True)
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    failed, started, stopped = 0, time.perf_counter(), None
    header = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    runs = planned_runs(backend)
    # shape by shape, every case at each: a run cut by its budget has checked every kernel at the
    # first shapes (decode) rather than the first kernels at every shape
    for (m, k, n), (name, case, case_backend) in itertools.product(shapes, runs):
        if m > CASE_MAX_M.get(name, m) or stopped:
            continue
        if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
            stopped = f"time budget of {args.time_budget_s:g} s reached before {name} M={m} K={k} N={n}"
            print(f"stopped: {stopped}", flush=True)
            continue
        row: dict[str, Any] = {"case": name, "m": m, "k": k, "n": n}
        try:
            err, tol = case(rng, m, k, n, case_backend)
            row.update(error=err, tolerance=tol, ok=err <= tol)
        except Exception as e:  # a compile error is a failed case, reported, not a crash
            row.update(
                ok=False, exception=f"{type(e).__name__}: {e}"[:3000], tb=traceback.format_exc()[-3000:]
            )
        failed += not row["ok"]
        results.append(row)
        detail = (
            f"error {row['error']:.3g} (tol {row['tolerance']:g})" if "error" in row else row["exception"]
        )
        print(f"{'OK  ' if row['ok'] else 'FAIL'} {name} M={m} K={k} N={n}: {detail}", flush=True)
        if args.out:  # after every case: a run cut short keeps what it checked
            write_json(pathlib.Path(args.out), {**header, "results": results, "stopped": None})
    if args.out:
        write_json(pathlib.Path(args.out), {**header, "results": results, "stopped": stopped})
    note = " (stopped early)" if stopped else ""
    print(f"{len(results) - failed}/{len(results)} cases OK{note}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
