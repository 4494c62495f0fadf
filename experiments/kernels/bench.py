"""Low-precision matmul kernels against XLA's bf16 matmul, over real layer shapes and token counts.

**What is timed.** For every layer shape ``(K, N)`` (Llama-2-7B and Llama-3-70B projections) and
every token count ``M`` of the sweep, ``y = x @ W`` with ``x`` of shape ``(M, K)`` by:

* ``bf16``: XLA's ``jnp.dot`` of bf16 ``x`` and bf16 ``W`` (bf16 output, default precision), the
  baseline every speedup divides;
* ``w4a16``: bf16 ``x``, 4-bit ``W`` packed two per byte, symmetric, one scale per group of 128
  rows of ``W`` (``qjax.kernels.w4a16``);
* ``w4a16-swap``: the same with ``swap_ab=True``: each tile computed as ``(w^T x^T)^T``, so the
  dequantized weight is the dot's left operand (Hopper's ``wgmma`` can take it from registers) and
  the small M the narrow side (GPU and interpreter only);
* ``w8a8``: ``x`` already int8 with one f32 scale per token, int8 ``W`` with one f32 scale per
  output column (``qjax.kernels.w8a8``);
* ``w8a8+quant``: the same matmul preceded by ``quantize_per_token`` of the bf16 ``x``
  (``qjax.kernels.act_quant``): a layer's cost with dynamic per-token activations quantized by
  that kernel (served ``qjax.nn`` models quantize activations with ``qjax.quantize``, which XLA
  fuses; that is not this row);
* ``fp8``: ``x`` and ``W`` in float8_e4m3fn, per-token and per-column f32 scales
  (``qjax.kernels.fp8``);
* ``w8a8-nk``, ``fp8-nk``: the ``w8a8`` and ``fp8`` kernels with ``W`` stored ``(N, K)``
  (``w_layout="nk"``, transposed once outside the timing): the K-major operand that Hopper's 8-bit
  ``wgmma`` reads, which Triton otherwise replaces by older instructions;
* ``w8a8-mgpu``, ``fp8-mgpu``: the ``w8a8`` and ``fp8`` matmuls on the Hopper path
  (``qjax.kernels.hopper``: Pallas on Mosaic GPU, TMA and ``wgmma``), ``W`` stored ``(N, K)`` by
  ``prepare_weight`` once, outside the timing, as ``w4a16``'s packing is; run with ``--backend gpu``
  only (listed as skipped otherwise);
* ``w4a16-mgpu``: the ``w4a16`` matmul on the Hopper path for small M (``qjax.kernels.hopper_w4``:
  the int4 weight ``(N, K)`` as ``wgmma``'s register operand, ``prepare_w4`` once), M <= 128 only,
  ``--backend gpu`` only;
* ``w8a8-split1``, ``fp8-split1``: the ``w8a8`` and ``fp8`` kernels with K in one range
  (``split_k=1``), at M <= 16 only: beside ``w8a8`` / ``fp8``, which split K there when the grid
  is too small to fill the GPU, they show what the split gains or costs;
* ``w8a8-xla``, ``fp8-xla``: the operands of ``w8a8`` and ``fp8`` through XLA's native int8 / fp8
  dot: ``qjax.kernels.xla.contract`` (int8 x int8 -> int32, or e4m3 x e4m3 -> f32, then times the
  outer product of the scales, float32), cast to bf16; what serving with ``kernels="xla"`` runs.
  XLA on every backend (on a GPU XLA hands the dot to cuBLAS where it can).

Data is random (uniform floats and integer codes; not zeros, which make GPU matmuls faster). On
a GPU (TPU) the Pallas kernels run with ``backend="gpu"`` (``"tpu"``). On CPU the default backend is
``reference``: each kernel's ``*_reference`` function compiled by XLA, labelled as such in every
output; it measures XLA on CPU, not the kernels. The ``-xla`` rows are XLA on every backend.
``--interpret`` runs the real Pallas kernels in the Pallas interpreter on tiny shapes (a smoke test
of the kernels; the times mean nothing).

**Method: whole programs over rotating weights, device time.** For each (kernel, shape, M) one
jitted program applies the kernel to ``R`` distinct random weight copies, passed as separate
arguments so that neither XLA's CSE nor the L2 cache can reuse one copy for another: ``R`` is chosen
so that the copies together exceed the L2 cache (``R * weight_bytes >= COPY_TARGET_BYTES``, 4x the
50 MB L2 of an H100), with ``2 <= R <= MAX_COPIES`` and at most ``MAX_PROGRAM_WEIGHT_BYTES`` (4 GiB)
of weights per program. The kernel is wrapped in its own ``jax.jit``, so it is traced and lowered
once per program, not ``R`` times. The activations of each copy pass through an
``optimization_barrier`` tied to the copy index, so the ``R`` quantizations of the same ``x`` in
``w8a8+quant`` are not merged into one; the ``R`` outputs go through an ``optimization_barrier``
(XLA can neither drop nor shrink a matmul) and the program returns the sum of one element of each.

Per (shape, M), the programs of all kernels are lowered, then compiled ahead of time (the XLA
programs, the bf16 baseline and the ``-xla`` rows, one at a time, since XLA autotunes its dots by
timing candidates on the device; the Pallas programs on ``--compile-workers`` threads), then timed
one after another, so compilation never overlaps a measurement and is excluded from it (its time is
recorded). The clock (``--clock``,
:mod:`experiments.kernels.timing`): on a GPU, **device time**, the summed durations of the program's
kernels from CUPTI activity records (device timestamps), one warm-up execution, then one sample per
execution (``n = --repeats``); every kernel of the program counts, the program's final reduction
included, and each cell lists its kernels by name, launches and time. Elsewhere (or with ``--clock
wall``, or where CUPTI fails, which the results then say) the **wall clock**: ``time.perf_counter``
around ``jax.block_until_ready``, a sample launching the program ``L`` times back to back (so that
host dispatch overlaps device work), ``n >= 3`` samples within about 0.4 s; wall times include the
launch gaps between kernels. Per-call time = sample time / (``L * R``); the reported time is the
median over the samples, ``spread`` their interquartile range over the median. Weights of a shape
are generated (and packed) once and reused for every M; activations are generated once at the
largest M and sliced; device buffers are deleted before the next shape. Results are written after
every shape, and the sweep stops before a (shape, M) group that would overrun ``--time-budget-s``.

**Accounting.** ``FLOPs = 2 M K N`` (the quantization and scaling work is not counted).
Bytes moved per call, counting each operand once at its stored size:

* activations: bf16 ``x``: ``2 M K``; int8 / fp8 ``x`` plus its scales: ``M K + 4 M``;
  ``w8a8+quant`` adds the quantization pass: read bf16 ``x`` (``2 M K``), write and read back the
  int8 ``x`` and scales (``2 (M K + 4 M)``);
* weights, one copy at its packed size (measured as the ``nbytes`` of its arrays): bf16 ``2 K N``;
  int8 / fp8 ``K N + 4 N``; w4a16 ``K N / 2 + (K / g) N s`` (+ the same for zeros if asymmetric),
  ``g = 128``, ``s`` the itemsize of the stored scales;
* output: ``2 M N`` (bf16).

``TFLOP/s = FLOPs / t`` and ``GB/s = bytes / t``. Roofline time
``t_roof = max(bytes / peak_bw, FLOPs / peak_flops)`` with ``peak_flops`` of the arithmetic the
kernel does (bf16 for bf16 and the w4a16 rows, int8 for the w8a8 rows, fp8 for the fp8 rows), from
:data:`DEVICE_PEAKS` (dense, no sparsity); ``% of roofline = 100 t_roof / t``. Devices not in the
table (and CPUs) get ``-`` in the roofline column. ``speedup = t_bf16 / t_kernel`` at the same
(shape, M) in the same run. The **crossover M** of a (kernel, shape) is the smallest M of the sweep
with speedup < 1; ``none`` if the kernel beats bf16 at every measured M.

**Goals** (:mod:`experiments.kernels.goals`; GPU sweeps only): W4A16 at M <= 16 at least 3x bf16,
W8A8 and FP8 at M >= 1024 at least 1.5x, judged per shape on the fastest of the goal's Pallas rows
at each M, then with XLA's own int8 / fp8 dot counted, in a column apart. Printed before the
compact table, in the markdown and in the JSON (``goals``); ``python -m experiments.kernels.goals``
judges results files afterwards, several of one device pooled.

Run (GPU, the whole sweep; stops cleanly when ``--time-budget-s``, default 450 s, would be exceeded)::

    python -m experiments.kernels.bench --out runs/bench_kernels/results.json \\
        --md runs/bench_kernels/results.md

Smoke run: ``python -m experiments.kernels.bench --quick`` (on CPU: tiny shapes, reference path).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
from jax import lax

from experiments.kernels import goals, timing

KERNELS = (
    "bf16",
    "w4a16",
    "w4a16-swap",
    "w8a8",
    "w8a8+quant",
    "fp8",
    "w8a8-nk",
    "fp8-nk",
    "w8a8-xla",
    "fp8-xla",
    "w8a8-split1",
    "fp8-split1",
    "w8a8-mgpu",
    "fp8-mgpu",
    "w4a16-mgpu",
)
# Pallas on Mosaic GPU: run with --backend gpu only
HOPPER_KERNELS = ("w8a8-mgpu", "fp8-mgpu", "w4a16-mgpu")
# XLA's native int8 / fp8 dot (qjax.kernels.xla.contract), XLA on every backend
XLA_KERNELS = ("w8a8-xla", "fp8-xla")
# Rows whose activations come quantized (int8 / fp8 values and per-token scales)
QUANTIZED_INPUT = ("w8a8", "fp8", "w8a8-nk", "fp8-nk", "w8a8-xla", "fp8-xla", "w8a8-split1", "fp8-split1")
# kernels for small M only: no cells above (the -split1 rows differ from w8a8 / fp8 only where the
# grid is small enough for K to be split)
MAX_M = {"w4a16-mgpu": 128, "w8a8-split1": 16, "fp8-split1": 16}
BASELINE = goals.BASELINE
# The programs whose dots XLA autotunes by timing candidates on the device: compiled one at a time
AUTOTUNED = (BASELINE, *XLA_KERNELS)
GROUP_SIZE = 128
M_SWEEP = (1, 16, 64, 256, 1024, 4096)
SHAPES: dict[str, tuple[int, int]] = {
    "7b.qkv": (4096, 12288),
    "7b.o": (4096, 4096),
    "7b.gate_up": (4096, 22016),
    "7b.down": (11008, 4096),
    "70b.qkv": (8192, 10240),
    "70b.o": (8192, 8192),
    "70b.gate_up": (8192, 57344),
    "70b.down": (28672, 8192),
    # Smoke shapes for CPU and the Pallas interpreter; not layer shapes.
    "tiny.a": (256, 256),
    "tiny.b": (512, 384),
}
SHAPE_GROUPS: dict[str, tuple[str, ...]] = {
    "llama2-7b": ("7b.qkv", "7b.o", "7b.gate_up", "7b.down"),
    "llama3-70b": ("70b.qkv", "70b.o", "70b.gate_up", "70b.down"),
    "all": tuple(s for s in SHAPES if not s.startswith("tiny")),
    "tiny": ("tiny.a", "tiny.b"),
}


class Preset(NamedTuple):
    shapes: tuple[str, ...]
    m: tuple[int, ...]


QUICK_ACCEL = Preset(("7b.qkv", "70b.o"), (1, 64, 1024))
QUICK_CPU = Preset(("tiny.a", "tiny.b"), (1, 16, 64))  # tiny smoke shapes, labelled as such
INTERPRET = Preset(("tiny.a", "tiny.b"), (1, 16))

L2_BYTES = 50 * 10**6
COPY_TARGET_BYTES = 4 * L2_BYTES
MAX_PROGRAM_WEIGHT_BYTES = 4 * 2**30
MAX_COPIES = 32

# Which weights (and activations) each kernel takes: kernels of one family share the same copies.
WEIGHT_FAMILY = {
    "bf16": "bf16",
    "w4a16": "w4",
    "w4a16-swap": "w4",
    "w8a8": "int8",
    "w8a8+quant": "int8",
    "fp8": "fp8",
    "w8a8-nk": "int8-nk",  # (N, K): the weight transposed once
    "fp8-nk": "fp8-nk",
    "w8a8-xla": "int8",
    "fp8-xla": "fp8",
    "w8a8-split1": "int8",
    "fp8-split1": "fp8",
    "w8a8-mgpu": "int8-hopper",  # (N, K) padded to the tiles of qjax.kernels.hopper, once
    "fp8-mgpu": "fp8-hopper",
    "w4a16-mgpu": "w4-hopper",  # qjax.kernels.hopper_w4.prepare_w4 of the w4 weight
}
ACT_FAMILY = {
    "bf16": "bf16",
    "w4a16": "bf16",
    "w4a16-swap": "bf16",
    "w8a8": "int8",
    "w8a8+quant": "bf16",
    "fp8": "fp8",
    "w8a8-nk": "int8",
    "fp8-nk": "fp8",
    "w8a8-xla": "int8",
    "fp8-xla": "fp8",
    "w8a8-split1": "int8",
    "fp8-split1": "fp8",
    "w8a8-mgpu": "int8",
    "fp8-mgpu": "fp8",
    "w4a16-mgpu": "bf16",
}
# The arithmetic each kernel does: its activations' format, except that w8a8+quant quantizes its
# bf16 activations to int8 first
ARITHMETIC = {**ACT_FAMILY, "w8a8+quant": "int8"}
MODULES = {
    "w4a16": ("w4a16",),
    "w4a16-swap": ("w4a16",),
    "w8a8": ("w8a8",),
    "w8a8+quant": ("w8a8", "act_quant"),
    "fp8": ("fp8",),
    "w8a8-nk": ("w8a8",),
    "fp8-nk": ("fp8",),
    "w8a8-xla": ("xla",),
    "fp8-xla": ("xla",),
    "w8a8-split1": ("w8a8",),
    "fp8-split1": ("fp8",),
    "w8a8-mgpu": ("hopper",),
    "fp8-mgpu": ("hopper",),
    "w4a16-mgpu": ("hopper_w4",),
}


@dataclasses.dataclass(frozen=True)
class Peaks:
    """Dense peak throughput of a device: FLOP/s per arithmetic and HBM bytes/s."""

    flops: Mapping[str, float]
    bandwidth: float


_HOPPER_FLOPS = {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12}
# (substrings the device_kind must contain, substrings it must not contain, peaks)
DEVICE_PEAKS: tuple[tuple[tuple[str, ...], tuple[str, ...], Peaks], ...] = (
    (("H100", "HBM3"), ("PCIe", "NVL"), Peaks(_HOPPER_FLOPS, 3.35e12)),  # "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), (), Peaks(_HOPPER_FLOPS, 3.35e12)),
    (("H200",), ("NVL",), Peaks(_HOPPER_FLOPS, 4.8e12)),
)


def device_peaks(device_kind: str) -> Peaks | None:
    """The peaks of ``device_kind`` from :data:`DEVICE_PEAKS`, ``None`` if it is not listed."""
    for need, avoid, peaks in DEVICE_PEAKS:
        if all(s in device_kind for s in need) and not any(s in device_kind for s in avoid):
            return peaks
    return None


# --------------------------------------------------------------------------------------------------
# Accounting


def matmul_flops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def activation_bytes(kernel: str, m: int, k: int) -> int:
    """Bytes of activation traffic per call (see the module docstring)."""
    quantized = m * k + 4 * m  # int8 / fp8 values and one f32 scale per token
    if kernel in ("bf16", "w4a16", "w4a16-swap", "w4a16-mgpu"):
        return 2 * m * k
    if kernel in (*QUANTIZED_INPUT, "w8a8-mgpu", "fp8-mgpu"):
        return quantized
    if kernel == "w8a8+quant":
        return 2 * m * k + 2 * quantized
    raise ValueError(f"unknown kernel {kernel!r}; kernels: {KERNELS}")


def nominal_weight_bytes(
    kernel: str, k: int, n: int, *, group_size: int = GROUP_SIZE, scale_itemsize: int = 4, zeros: bool = False
) -> int:
    """Bytes of one weight copy of ``kernel`` with no padding: values, scales (and zeros)."""
    family = WEIGHT_FAMILY[kernel]
    if family == "bf16":
        return 2 * k * n
    if family in ("int8", "fp8", "int8-nk", "fp8-nk", "int8-hopper", "fp8-hopper"):
        return k * n + 4 * n
    groups = -(-k // group_size) * n
    return k * n // 2 + groups * scale_itemsize * (2 if zeros else 1)


def traffic_bytes(kernel: str, m: int, k: int, n: int, weight_bytes: int) -> int:
    """Bytes moved by one call: activations + one weight copy (``weight_bytes``) + the bf16 output."""
    return activation_bytes(kernel, m, k) + weight_bytes + 2 * m * n


def roofline_seconds(kernel: str, flops: int, nbytes: int, peaks: Peaks | None) -> float | None:
    """``max(bytes / peak_bw, flops / peak_flops)`` for ``kernel``'s arithmetic; None without peaks."""
    if peaks is None:
        return None
    return max(nbytes / peaks.bandwidth, flops / peaks.flops[ARITHMETIC[kernel]])


def crossover(speedups: Mapping[int, float | None]) -> int | str:
    """The smallest M whose speedup is < 1, ``"none"`` if every measured M wins, ``"-"`` if none
    was measured (``None`` values are unmeasured cells)."""
    measured = sorted((m, s) for m, s in speedups.items() if s is not None)
    if not measured:
        return "-"
    return next((m for m, s in measured if s < 1.0), "none")


# --------------------------------------------------------------------------------------------------
# Kernels and data


def kernel_module(name: str) -> Any:
    return importlib.import_module(f"qjax.kernels.{name}")


def missing_modules(kernel: str) -> list[str]:
    """The ``qjax.kernels`` modules ``kernel`` needs that cannot be imported."""
    missing = []
    for name in MODULES.get(kernel, ()):
        try:
            kernel_module(name)
        except ImportError:
            missing.append(f"qjax.kernels.{name}")
    return missing


def kernel_fn(kernel: str, backend: str) -> Callable[[Any, Any], jax.Array]:
    """``(activations, weights) -> (M, N) output`` of ``kernel``; ``backend="reference"`` calls the
    ``*_reference`` functions (XLA), any other backend the Pallas kernel built for it; the ``-xla``
    rows are XLA's own int8 / fp8 dot on every backend."""
    ref = backend == "reference"
    opts: dict[str, Any] = {} if ref else {"backend": backend}
    if kernel == "bf16":
        return lambda x, w: jnp.dot(x, w)
    if kernel in XLA_KERNELS:  # the same on every backend
        xla = kernel_module("xla")
        kn = (((1,), (0,)), ((), ()))
        return lambda x, w: xla.contract(
            xla.Operand(x[0], None, x[1]), xla.Operand(w[0], None, w[1]), kn
        ).astype(jnp.bfloat16)
    if kernel == "w4a16-mgpu":  # weight prepared by hopper_w4.prepare_w4
        w4h = kernel_module("hopper_w4")
        return lambda x, w: w4h.w4a16_matmul_hopper(x, w)
    if kernel in HOPPER_KERNELS:  # operands as the public kernels check them; weight (N, K) prepared
        hop = kernel_module("hopper")
        acc = jnp.int32 if kernel.startswith("w8a8") else jnp.float32
        return lambda x, w: hop.scaled_matmul_hopper(
            x[0],
            w[0],
            {"x_scale": x[1], "w_scale": w[1]},
            n=w[1].shape[1],
            acc_dtype=acc,
            out_dtype=jnp.bfloat16,
        )
    if kernel in ("w4a16", "w4a16-swap"):
        mod = kernel_module("w4a16")
        w4 = mod.w4a16_matmul_reference if ref else mod.w4a16_matmul
        if kernel == "w4a16-swap" and not ref:  # the reference has no tiles to swap
            opts["swap_ab"] = True
        return lambda x, w: w4(x, w, **opts)
    if kernel.endswith("-nk"):  # the weight (N, K), K contiguous
        opts["w_layout"] = "nk"
    if kernel.endswith("-split1") and not ref:  # K in one range (the reference has no ranges)
        opts["split_k"] = 1
    if kernel.startswith("fp8"):
        mod = kernel_module("fp8")
        f8 = mod.fp8_matmul_reference if ref else mod.fp8_matmul
        return lambda x, w: f8(x[0], x[1], w[0], w[1], **opts)
    mod = kernel_module("w8a8")
    i8 = mod.w8a8_matmul_reference if ref else mod.w8a8_matmul
    if kernel in ("w8a8", "w8a8-nk", "w8a8-split1"):
        return lambda x, w: i8(x[0], x[1], w[0], w[1], **opts)
    aq = kernel_module("act_quant")
    quant = aq.quantize_per_token_reference if ref else aq.quantize_per_token

    def quant_then_matmul(x: jax.Array, w: Any) -> jax.Array:
        q, scale = quant(x, dtype=jnp.int8, **opts)
        return i8(q, scale, w[0], w[1], **opts)

    return quant_then_matmul


# Random data from raw bits and uniforms (cheap to compile, unlike randint and normal): int8 codes
# uniform on [-128, 127], int4 codes on [-8, 7], floats uniform on [-1, 1) (times 2 for fp8), scales
# uniform on [0.5, 1.5) times a magnitude that keeps outputs finite.


def _scales(key: jax.Array, shape: tuple[int, ...], magnitude: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5) * magnitude


def _values(key: jax.Array, shape: tuple[int, ...], kind: str) -> jax.Array:
    if kind == "int8":
        return lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint8), jnp.int8)
    if kind == "int4":
        return (jax.random.bits(key, shape, jnp.uint8) & 15).astype(jnp.int8) - jnp.int8(8)
    if kind == "fp8":
        return jax.random.uniform(key, shape, jnp.float32, -2.0, 2.0).astype(jnp.float8_e4m3fn)
    return jax.random.uniform(key, shape, jnp.bfloat16, -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def make_weights(family: str, key: jax.Array, k: int, n: int) -> Any:
    """One random weight copy of ``family`` for a ``(k, n)`` layer, packed for its kernel."""
    kv, ks = jax.random.split(key)
    if family == "bf16":
        return _values(kv, (k, n), "bf16")
    if family in ("int8", "fp8"):
        return _values(kv, (k, n), family), _scales(ks, (1, n), 1e-3 if family == "int8" else 1e-2)
    if family in ("int8-nk", "fp8-nk", "int8-hopper", "fp8-hopper"):
        base = family.split("-")[0]
        w = _values(kv, (k, n), base)
        w = kernel_module("hopper").prepare_weight(w) if family.endswith("hopper") else w.T
        return w, _scales(ks, (1, n), 1e-3 if base == "int8" else 1e-2)
    # w4: symmetric int4 codes with f32 group scales, packed under jit (pack_w4 checks the code range
    # only on concrete arrays, which would copy the codes to the host); w4-hopper: that, prepared
    q, scales = _values(kv, (k, n), "int4"), _scales(ks, (-(-k // GROUP_SIZE), n), 1e-2)
    packed = kernel_module("w4a16").pack_w4(q, scales, None, group_size=GROUP_SIZE)
    return kernel_module("hopper_w4").prepare_w4(packed) if family == "w4-hopper" else packed


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def make_activations(family: str, key: jax.Array, m: int, k: int) -> Any:
    """Random activations of ``family``: bf16 ``x``, or int8 / fp8 ``x`` with per-token scales."""
    kv, ks = jax.random.split(key)
    if family == "bf16":
        return _values(kv, (m, k), "bf16")
    return _values(kv, (m, k), family), _scales(ks, (m, 1), 2e-2 if family == "int8" else 1e-1)


def tree_nbytes(tree: Any) -> int:
    """Bytes of the arrays (or ``jax.ShapeDtypeStruct``) of ``tree``, sub-byte types (int4) packed."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(-(-math.prod(leaf.shape) * jax.dtypes.itemsize_bits(leaf.dtype) // 8) for leaf in leaves)


def delete_tree(tree: Any) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


def num_copies(weight_bytes: int, fixed: int | None = None) -> int:
    """``R``: enough copies to exceed the L2 cache, within the per-program weight limit."""
    if fixed is not None:
        return fixed
    wanted = max(2, -(-COPY_TARGET_BYTES // max(weight_bytes, 1)))
    fits = max(1, MAX_PROGRAM_WEIGHT_BYTES // max(weight_bytes, 1))
    return min(wanted, MAX_COPIES, fits)


# --------------------------------------------------------------------------------------------------
# Programs and timing


def build_program(fn: Callable[[Any, Any], jax.Array]) -> Callable[..., jax.Array]:
    """``program(x, *weights)``: ``fn`` applied to every weight copy, one scalar out.

    ``fn`` is wrapped in its own ``jax.jit`` so that its R calls are traced and lowered once."""
    inner = jax.jit(fn)

    def program(x: Any, *weights: Any) -> jax.Array:
        outs = []
        for r, w in enumerate(weights):
            xr, _ = lax.optimization_barrier((x, jnp.int32(r)))  # no CSE of x-only work across copies
            outs.append(inner(xr, w))
        outs = lax.optimization_barrier(outs)
        return jnp.stack([o[0, 0].astype(jnp.float32) for o in outs]).sum()

    return program


# --------------------------------------------------------------------------------------------------
# The sweep


@dataclasses.dataclass(frozen=True)
class Config:
    kernels: tuple[str, ...]
    shapes: tuple[tuple[str, int, int], ...]  # (name, K, N)
    ms: tuple[int, ...]
    repeats: int
    backend: str  # "gpu", "tpu", "interpret" (Pallas kernels) or "reference" (XLA *_reference)
    copies: int | None  # fixed R, or None: chosen per weight size
    budget_s: float | None
    compile_workers: int = 1
    skipped: tuple[str, ...] = ()
    clock: str = "wall"  # "device" (CUPTI) or "wall", see experiments.kernels.timing
    clock_note: str | None = None  # why --clock auto fell back to the wall clock


@dataclasses.dataclass
class Sweep:
    config: Config
    meta: dict[str, Any]
    peaks: Peaks | None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    cells: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_group_s: float = 0.0
    stopped: str | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        """Whether the next (shape, M) group, estimated as long as the last one, would overrun."""
        budget = self.config.budget_s
        if budget is not None and self.elapsed() + self.last_group_s > budget:
            self.stopped = f"time budget of {budget:g} s reached after {self.elapsed():.1f} s"
        return self.stopped is not None


def make_copies(family: str, k: int, n: int, fixed: int | None) -> list[Any]:
    """``R`` distinct random weight copies of ``family`` (the first decides ``R`` by its size)."""
    base = jax.random.key(k * 1_000_003 + n, impl="rbg")
    first = make_weights(family, jax.random.fold_in(base, 0), k, n)
    copies = num_copies(tree_nbytes(first), fixed)
    return [first] + [make_weights(family, jax.random.fold_in(base, r), k, n) for r in range(1, copies)]


@dataclasses.dataclass
class ShapeData:
    """The device data of one shape, made on first use: weight copies per family (kept for every M),
    activations per family for the largest M (made once) and their first M rows for the current M."""

    k: int
    n: int
    max_m: int
    fixed_copies: int | None
    weights: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    full_acts: dict[str, Any] = dataclasses.field(default_factory=dict)
    acts: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict)

    def weight_copies(self, family: str) -> list[Any]:
        if family not in self.weights:
            self.weights[family] = make_copies(family, self.k, self.n, self.fixed_copies)
        return self.weights[family]

    def activations(self, family: str, m: int) -> Any:
        if family not in self.full_acts:
            key = jax.random.key(self.k, impl="rbg")
            self.full_acts[family] = make_activations(family, key, self.max_m, self.k)
        if (family, m) not in self.acts:
            self.acts[(family, m)] = jax.tree.map(lambda a: a[:m], self.full_acts[family])
        return self.acts[(family, m)]

    def delete(self, activations_only: bool = False) -> None:
        """Free the device buffers (only the current M's activations if ``activations_only``)."""
        full = {id(a) for a in jax.tree_util.tree_leaves(self.full_acts)}  # a[:max_m] may be a itself
        delete_tree([a for a in jax.tree_util.tree_leaves(self.acts) if id(a) not in full])
        self.acts.clear()
        if not activations_only:
            delete_tree([self.full_acts, self.weights])
            self.full_acts.clear()
            self.weights.clear()


def add_metrics(cell: dict[str, Any], peaks: Peaks | None) -> None:
    """FLOPs, bytes, TFLOP/s, GB/s and roofline fields of a measured cell."""
    m, k, n, kernel = cell["m"], cell["k"], cell["n"], cell["kernel"]
    flops = matmul_flops(m, k, n)
    nbytes = traffic_bytes(kernel, m, k, n, cell["weight_bytes"])
    roof = roofline_seconds(kernel, flops, nbytes, peaks)
    t = cell["time_s"]
    cell.update(flops=flops, bytes=nbytes, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9)
    cell.update(roofline_s=roof, roofline_pct=None if roof is None else 100.0 * roof / t)


def _error(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def lower_cell(
    cell: dict[str, Any], program: Callable[..., Any], data: ShapeData
) -> tuple[Any, tuple[Any, ...]]:
    """The lowered program of a cell and its arguments; records the weight bytes and ``R``."""
    weights = data.weight_copies(WEIGHT_FAMILY[cell["kernel"]])
    x = data.activations(ACT_FAMILY[cell["kernel"]], cell["m"])
    cell.update(weight_bytes=tree_nbytes(weights[0]), copies=len(weights))
    return jax.jit(program).lower(x, *weights), (x, *weights)


def compile_cells(
    lowered: Mapping[str, Any], cells: Mapping[str, dict[str, Any]], workers: int
) -> dict[str, Any]:
    """Compile the lowered programs: the XLA programs (:data:`AUTOTUNED`) one at a time first (XLA
    autotunes their dots by timing candidates on the device), then the others on ``workers``
    threads. Failures are recorded in the cells."""

    def compile_one(kernel: str) -> Any:
        start = time.perf_counter()
        compiled = lowered[kernel].compile()
        cells[kernel]["compile_s"] = time.perf_counter() - start
        return compiled

    out: dict[str, Any] = {}

    def collect(kernel: str, future: concurrent.futures.Future[Any]) -> None:
        try:
            out[kernel] = future.result()
        except Exception as e:
            cells[kernel]["error"] = _error(e)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for kernel in AUTOTUNED:
            if kernel in lowered:
                collect(kernel, pool.submit(compile_one, kernel))
        futures = {kernel: pool.submit(compile_one, kernel) for kernel in lowered if kernel not in AUTOTUNED}
        for kernel, future in futures.items():
            collect(kernel, future)
    return out


def time_cell(cell: dict[str, Any], compiled: Any, args: tuple[Any, ...], sweep: Sweep) -> None:
    t = timing.time_program(sweep.config.clock, compiled, args, cell["copies"], sweep.config.repeats)
    cell.update(time_s=t.seconds, time_min_s=t.min_seconds, spread=t.spread, clock=t.clock)
    cell.update(launches=t.launches, repeats=t.repeats)
    if t.kernels is not None:
        cell["device_kernels"] = t.kernels
    if t.note is not None:
        cell["clock_note"] = t.note
    add_metrics(cell, sweep.peaks)


def run_group(
    sweep: Sweep,
    shape: tuple[str, int, int],
    m: int,
    programs: Mapping[str, Callable[..., Any]],
    data: ShapeData,
) -> list[dict[str, Any]]:
    """Every kernel at one (shape, M): inputs made and programs lowered one by one, compiled (in
    parallel), then timed one after another. Failures are recorded in the cells, not raised."""
    name, k, n = shape
    kernels = [kern for kern in sweep.config.kernels if m <= MAX_M.get(kern, m)]
    cells = {kern: {"kernel": kern, "shape": name, "k": k, "n": n, "m": m} for kern in kernels}
    lowered: dict[str, Any] = {}
    args: dict[str, tuple[Any, ...]] = {}
    for kernel, cell in cells.items():
        try:  # a broken kernel or an out-of-memory must not end the sweep
            lowered[kernel], args[kernel] = lower_cell(cell, programs[kernel], data)
        except Exception as e:
            cell["error"] = _error(e)
    compiled = compile_cells(lowered, cells, sweep.config.compile_workers)
    lowered.clear()
    for kernel, executable in compiled.items():
        try:
            time_cell(cells[kernel], executable, args[kernel], sweep)
        except Exception as e:
            cells[kernel]["error"] = _error(e)
    return list(cells.values())


def run_shape(
    sweep: Sweep,
    shape: tuple[str, int, int],
    programs: Mapping[str, Callable[..., Any]],
    log: Callable[[str], None],
) -> None:
    """Every (kernel, M) of one shape; the shape's data is made once and deleted at the end."""
    data = ShapeData(shape[1], shape[2], max(sweep.config.ms), sweep.config.copies)
    try:
        for m in sweep.config.ms:
            if sweep.out_of_time():
                return
            start = time.perf_counter()
            cells = run_group(sweep, shape, m, programs, data)
            sweep.last_group_s = time.perf_counter() - start
            sweep.cells += cells
            add_speedups(sweep.cells)
            for cell in cells:
                log(cell_line(cell, sweep.elapsed()))
            data.delete(activations_only=True)
    finally:
        data.delete()


def add_speedups(cells: list[dict[str, Any]]) -> None:
    """``speedup = t_bf16 / t`` for every cell whose bf16 cell (same shape and M) was measured."""
    base = {(c["shape"], c["m"]): c.get("time_s") for c in cells if c["kernel"] == BASELINE}
    for c in cells:
        t_base = base.get((c["shape"], c["m"]))
        c["speedup"] = t_base / c["time_s"] if t_base and c.get("time_s") else None


def crossovers(sweep: Sweep) -> list[dict[str, Any]]:
    """Per non-baseline kernel and shape: speedup at each M and the crossover M."""
    rows = []
    for kernel in sweep.config.kernels:
        if kernel == BASELINE:
            continue
        for name, _, _ in sweep.config.shapes:
            cells = [c for c in sweep.cells if c["kernel"] == kernel and c["shape"] == name]
            if cells:
                speedups = {c["m"]: c.get("speedup") for c in cells}
                rows.append(
                    {"kernel": kernel, "shape": name, "speedups": speedups, "crossover": crossover(speedups)}
                )
    return rows


def goal_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """The goals of :mod:`experiments.kernels.goals` judged on this sweep (none off GPUs)."""
    return goals.judge(sweep.config.backend, [name for name, _, _ in sweep.config.shapes], sweep.cells)


def goals_text(sweep: Sweep) -> str:
    """The goals, one line per (goal, shape) measured: printed before the compact table."""
    return goals.text(goal_rows(sweep))


def run_sweep(sweep: Sweep, write: Callable[[Sweep], None], log: Callable[[str], None] = print) -> None:
    """Run every shape of the sweep, writing the results after each shape."""
    programs = {k: build_program(kernel_fn(k, sweep.config.backend)) for k in sweep.config.kernels}
    for shape in sweep.config.shapes:
        if sweep.stopped:
            break
        run_shape(sweep, shape, programs, log)
        write(sweep)
    if sweep.stopped:
        log(f"stopped: {sweep.stopped}")


# --------------------------------------------------------------------------------------------------
# Output


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cell_line(cell: dict[str, Any], elapsed: float) -> str:
    """One progress line for a measured cell."""
    head = f"[{elapsed:6.1f}s] {cell['kernel']:<11} {cell['shape']:<12} M={cell['m']:<5}"
    if "error" in cell:
        return f"{head} ERROR {cell['error']}"
    pct = cell["roofline_pct"]
    return (
        f"{head} {1e6 * cell['time_s']:9.1f} us {cell['tflops']:7.1f} TF/s {cell['gbps']:7.0f} GB/s "
        f"roof {'-' if pct is None else f'{pct:.1f}%':>6} speedup {_num(cell['speedup'], '.2f')} "
        f"(R={cell['copies']} L={cell['launches']} n={cell['repeats']} spread {100 * cell['spread']:.0f}% "
        f"compile {cell['compile_s']:.1f}s){top_kernel(cell)}"
        + (f" [wall clock: {cell['clock_note']}]" if "clock_note" in cell else "")
    )


def top_kernel(cell: dict[str, Any]) -> str:
    """`` longest: NAME xLAUNCHES P%`` of a device-timed cell's program (empty otherwise)."""
    kernels = cell.get("device_kernels")
    if not kernels:
        return ""
    total = sum(k["us"] for k in kernels)
    top = kernels[0]
    share = 100 * top["us"] / total if total > 0 else 0.0
    return f" longest: {top['name'][:48]} x{top['launches']} {share:.0f}% of {len(kernels)} kernels"


def compact_table(sweep: Sweep) -> str:
    """bf16 time per call (us) and every kernel's speedup over it at each M, with the crossover."""
    ms = sweep.config.ms
    width = max([11, *(len(s) for s, _, _ in sweep.config.shapes)])
    head = f"{'kernel':<11} {'shape':<{width}} " + " ".join(f"{'M=' + str(m):>8}" for m in ms)
    lines = [
        f"speedup over XLA bf16 (t_bf16 / t_kernel; bf16 rows: us per call); crossover = smallest M with "
        f"speedup < 1 [backend: {sweep.config.backend}]",
        f"{head}  crossover",
    ]
    by_key = {(c["kernel"], c["shape"], c["m"]): c for c in sweep.cells}
    cross = {(r["kernel"], r["shape"]): r["crossover"] for r in crossovers(sweep)}
    for kernel in sweep.config.kernels:
        for name, _, _ in sweep.config.shapes:
            row = [by_key.get((kernel, name, m)) for m in ms]
            if not any(row):
                continue
            if kernel == BASELINE:
                vals = [_num(c.get("time_s") and 1e6 * c["time_s"], ".1f") if c else "" for c in row]
            else:
                vals = [
                    ("ERR" if "error" in c else _num(c.get("speedup"), ".2f") + "x") if c else "" for c in row
                ]
            tail = "" if kernel == BASELINE else f"  {cross.get((kernel, name), '-')}"
            label = "bf16 (us)" if kernel == BASELINE else kernel
            lines.append(f"{label:<11} {name:<{width}} " + " ".join(f"{v:>8}" for v in vals) + tail)
    return "\n".join(lines)


def markdown(sweep: Sweep) -> str:
    """The full cell table and the crossover table, in markdown."""
    meta = sweep.meta
    lines = [
        f"# Kernel benchmark: {meta['device_kind']} ({meta['platform']}), backend `{meta['backend']}`",
        "",
        f"jax {meta['jax_version']}; {meta['method']}",
        "",
        "| kernel | shape | K | N | M | us/call | TFLOP/s | GB/s | % roofline | speedup vs bf16 | R |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sweep.cells:
        if "error" in c:
            error = c["error"][:80].replace("|", "/")
            lines.append(
                f"| {c['kernel']} | {c['shape']} | {c['k']} | {c['n']} | {c['m']} | error: {error} |"
                + " |" * 5
            )
            continue
        lines.append(
            f"| {c['kernel']} | {c['shape']} | {c['k']} | {c['n']} | {c['m']} | {1e6 * c['time_s']:.1f}"
            f"{' (wall)' if 'clock_note' in c else ''} | "
            f"{c['tflops']:.1f} | {c['gbps']:.0f} | {_num(c['roofline_pct'], '.1f')} | "
            f"{_num(c['speedup'], '.2f')} | {c['copies']} |"
        )
    ms = sweep.config.ms
    lines += ["", "| kernel | shape | " + " | ".join(f"M={m}" for m in ms) + " | crossover M |"]
    lines.append("|---|---|" + "---:|" * len(ms) + "---|")
    for r in crossovers(sweep):
        vals = [_num(r["speedups"].get(m), ".2f") for m in ms]
        lines.append(f"| {r['kernel']} | {r['shape']} | " + " | ".join(vals) + f" | {r['crossover']} |")
    goal_lines = goals.markdown_lines(goal_rows(sweep))
    if goal_lines:
        lines += ["", *goal_lines]
    timed = [c for c in sweep.cells if c.get("device_kernels")]
    if timed:
        lines += [
            "",
            "GPU kernels of each program (device clock; per program of R calls, longest first, top 3):",
            "",
            "| kernel | shape | M | R | kernels: name x launches: us |",
            "|---|---|---:|---:|---|",
        ]
        for c in timed:
            top = "; ".join(
                f"`{k['name'][:60]}` x{k['launches']}: {k['us']:.1f}" for k in c["device_kernels"][:3]
            )
            lines.append(f"| {c['kernel']} | {c['shape']} | {c['m']} | {c['copies']} | {top} |")
    if sweep.stopped:
        lines += ["", f"Stopped early: {sweep.stopped}."]
    return "\n".join(lines) + "\n"


def payload(sweep: Sweep) -> dict[str, Any]:
    """Everything measured, as JSON-ready data."""
    return {
        "meta": sweep.meta,
        "cells": sweep.cells,
        "crossover": [
            {**r, "speedups": {str(m): s for m, s in r["speedups"].items()}} for r in crossovers(sweep)
        ],
        "goals": goals.json_rows(goal_rows(sweep)),
        "wall_s": sweep.elapsed(),
        "stopped": sweep.stopped,
    }


def writer(out: pathlib.Path | None, md: pathlib.Path | None) -> Callable[[Sweep], None]:
    """A function writing the JSON and markdown results (each atomically) of a sweep."""
    from experiments.records import write_atomic, write_json

    def write(sweep: Sweep) -> None:
        if out is not None:
            write_json(out, payload(sweep))
        if md is not None:
            write_atomic(md, markdown(sweep))

    return write


# --------------------------------------------------------------------------------------------------
# Command line


def parse_shapes(spec: str) -> tuple[tuple[str, int, int], ...]:
    """Comma-separated shape names (``7b.qkv``), groups (``llama2-7b``, ``all``, ``tiny``) or ``KxN``."""
    names: list[str] = []
    for token in filter(None, (t.strip() for t in spec.split(","))):
        names += SHAPE_GROUPS.get(token, (token,))
    shapes = []
    for name in dict.fromkeys(names):
        if name in SHAPES:
            shapes.append((name, *SHAPES[name]))
        elif "x" in name and all(p.isdigit() for p in name.split("x", 1)):
            k, n = (int(p) for p in name.split("x", 1))
            shapes.append((name, k, n))
        else:
            raise SystemExit(f"--shapes: unknown {name!r}; names: {[*SHAPE_GROUPS, *SHAPES]} or KxN")
    return tuple(shapes)


def parse_kernels(spec: str) -> tuple[str, ...]:
    kernels = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise SystemExit(f"--kernels: unknown {unknown}; kernels: {list(KERNELS)}")
    return tuple(k for k in KERNELS if k in kernels or k == BASELINE)  # the baseline is always run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few shapes and M (tiny shapes on CPU)")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    p.add_argument("--shapes", help="comma-separated shape names, groups or KxN (default: all layer shapes)")
    p.add_argument("--m", help=f"comma-separated token counts (default {','.join(map(str, M_SWEEP))})")
    p.add_argument("--repeats", type=int, help="timed samples per cell (default 10, --quick 5)")
    p.add_argument(
        "--backend",
        choices=("gpu", "tpu", "interpret", "reference"),
        help="default: the device's (gpu/tpu), 'reference' on CPU (XLA *_reference functions)",
    )
    p.add_argument(
        "--interpret", action="store_true", help="real Pallas kernels in interpret mode, tiny shapes"
    )
    timing.add_clock_argument(p)
    p.add_argument("--copies", type=int, help="weight copies per program R (default: by size; 2 on CPU)")
    workers = max(1, min(4, (os.cpu_count() or 2) // 2))
    p.add_argument(
        "--compile-workers", type=int, default=workers, help=f"compile threads (default {workers})"
    )
    p.add_argument("--time-budget-s", type=float, default=450.0, help="stop cleanly after this (default 450)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench_kernels/results.json"))
    p.add_argument("--md", type=pathlib.Path, help="markdown tables (default: --out with suffix .md)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    """The sweep the arguments ask for, with the device's defaults filled in."""
    from qjax.kernels.blocks import resolve_backend

    cpu = jax.default_backend() == "cpu"
    backend = "interpret" if args.interpret else args.backend
    if backend is None:
        backend = "reference" if cpu else resolve_backend(None)
    preset = None
    if backend == "interpret":
        preset = INTERPRET
    elif args.quick:
        preset = QUICK_CPU if cpu else QUICK_ACCEL
    shapes = parse_shapes(args.shapes or ",".join(preset.shapes if preset else SHAPE_GROUPS["all"]))
    ms = tuple(int(t) for t in args.m.split(",")) if args.m else tuple(preset.m if preset else M_SWEEP)
    kernels = parse_kernels(args.kernels)
    missing = {k: missing_modules(k) for k in kernels}
    skipped = tuple(f"{k} (missing {', '.join(missing[k])})" for k in kernels if missing[k])
    kernels = tuple(k for k in kernels if not missing[k])
    if backend == "tpu" and "w4a16-swap" in kernels:
        skipped += ("w4a16-swap (swap_ab: an option of the GPU kernel)",)
        kernels = tuple(k for k in kernels if k != "w4a16-swap")
    if backend != "gpu":
        skipped += tuple(
            f"{k} (Mosaic GPU: runs with backend gpu only)" for k in kernels if k in HOPPER_KERNELS
        )
        kernels = tuple(k for k in kernels if k not in HOPPER_KERNELS)
    repeats = args.repeats or (5 if args.quick or backend == "interpret" else 10)
    copies = args.copies or (2 if cpu or backend == "interpret" else None)
    clock, clock_note = timing.resolve_clock(args.clock, _exit)
    return Config(
        kernels,
        shapes,
        ms,
        repeats,
        backend,
        copies,
        args.time_budget_s,
        args.compile_workers,
        skipped,
        clock,
        clock_note,
    )


def _exit(message: str) -> NoReturn:
    raise SystemExit(message)


BACKEND_NOTES = {
    "reference": "XLA-compiled *_reference functions, NOT the Pallas kernels",
    "interpret": "Pallas kernels in the Pallas interpreter (tiny shapes; not representative timings)",
    "gpu": "Pallas kernels on Triton; the -mgpu rows Pallas on Mosaic GPU (sm_90)",
    "tpu": "Pallas kernels on Mosaic",
}
XLA_NOTE = "; the -xla rows: XLA's native int8 / fp8 dot (qjax.kernels.xla.contract) on every backend"
PROGRAMS = (
    "each program applies the kernel to R distinct weight copies (> L2 in total); time per call = "
    "program time / R, median over samples; compile excluded"
)


def backend_note(config: Config) -> str:
    """What the backend runs, for the results' header."""
    xla_rows = any(k in XLA_KERNELS for k in config.kernels)
    return BACKEND_NOTES[config.backend] + (XLA_NOTE if xla_rows else "")


def method(config: Config) -> str:
    """How the cells were timed, for the results' header."""
    return f"{timing.describe(config.clock, config.clock_note)}; {PROGRAMS}"


def make_meta(config: Config, argv: Sequence[str] | None) -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "backend": config.backend,
        "backend_note": backend_note(config),
        "method": method(config),
        "clock": config.clock,
        "peaks": None if (p := device_peaks(device.device_kind)) is None else dataclasses.asdict(p),
        "kernels": list(config.kernels),
        "skipped_kernels": list(config.skipped),
        "shapes": {name: [k, n] for name, k, n in config.shapes},
        "ms": list(config.ms),
        "repeats": config.repeats,
        "copies": config.copies or f"by size: >= {COPY_TARGET_BYTES} bytes, 2..{MAX_COPIES}",
        "argv": list(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def header(sweep: Sweep) -> str:
    m, c = sweep.meta, sweep.config
    lines = [
        f"device: {m['device_kind']} ({m['platform']}); jax {m['jax_version']}; "
        f"backend: {c.backend} = {m['backend_note']}",
        f"method: {m['method']}",
        f"peaks: {m['peaks'] or '- (device not in the table: roofline columns are -)'}",
        f"sweep: {len(c.kernels)} kernels x {len(c.shapes)} shapes x {len(c.ms)} M = "
        f"{len(c.kernels) * len(c.shapes) * len(c.ms)} programs; M {list(c.ms)}; time budget {c.budget_s} s",
        f"R (weight copies per program): {m['copies']}; repeats <= {c.repeats}; "
        f"compile threads {c.compile_workers}",
    ]
    if any(s.startswith("tiny") for s, _, _ in c.shapes):
        lines.append(
            "shapes: tiny smoke shapes (not layer shapes): "
            + ", ".join(f"{s} {k}x{n}" for s, k, n in c.shapes)
        )
    if c.skipped:
        lines.append(f"skipped kernels: {', '.join(c.skipped)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()  # the budget counts device start-up too
    args = parse_args(argv)
    config = make_config(args)
    sweep = Sweep(config, {}, device_peaks(jax.devices()[0].device_kind), started)
    sweep.meta = make_meta(config, argv)
    md = args.md or (args.out.with_suffix(".md") if args.out else None)
    write = writer(args.out, md)
    print(header(sweep), flush=True)
    run_sweep(sweep, write, log=lambda line: print(line, flush=True))
    write(sweep)
    print(f"total wall time {sweep.elapsed():.1f} s; wrote {args.out} and {md}")
    judged = goals_text(sweep)
    if judged:
        print(judged)
    print(compact_table(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
