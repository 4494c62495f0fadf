"""The rows of the benchmark: which kernels it times, on which weights and activations, and the
shapes and token counts it sweeps (the package docstring says what each row is)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from experiments.kernels import goals

Fn = Callable[[Any, Any], jax.Array]  # (activations, weights) -> (M, N)


class Row(NamedTuple):
    """A kernel the benchmark times: its ``name``, the family of its ``weights`` and of its
    ``activations`` (rows of one family share the same random copies), the ``qjax.kernels`` modules
    it needs (a row whose modules cannot be imported is skipped), ``max_m`` (no cells above),
    ``arithmetic`` (the peak its roofline uses, if not its activations' format) and ``build``:
    ``build(backend) -> fn``, the function timed (``backend="reference"``: the ``*_reference``)."""

    name: str
    weights: str
    activations: str
    modules: tuple[str, ...]
    build: Callable[[str], Fn]
    max_m: int | None = None
    arithmetic: str | None = None


def kernel_module(name: str) -> Any:
    """``qjax.kernels.<name>`` (``name`` may be ``experimental.<module>``)."""
    return importlib.import_module(f"qjax.kernels.{name}")


def _bf16(backend: str) -> Fn:
    return lambda x, w: jnp.dot(x, w)


def _xla_dot(backend: str) -> Fn:
    """XLA's native int8 / fp8 dot of the scaled operands, the same on every backend."""
    xla = kernel_module("xla")
    kn = (((1,), (0,)), ((), ()))
    return lambda x, w: xla.contract(xla.Operand(x[0], None, x[1]), xla.Operand(w[0], None, w[1]), kn).astype(
        jnp.bfloat16
    )


def _w4a16(**options: Any) -> Callable[[str], Fn]:
    """W4A16 rows; ``options`` of the experimental variant (the reference has no tiles to swap)."""

    def build(backend: str) -> Fn:
        mod = kernel_module("w4a16")
        if backend == "reference":
            return lambda x, w: mod.w4a16_matmul_reference(x, w)
        if options:
            variant = kernel_module("experimental.w4a16_variants").w4a16_matmul_variant
            return lambda x, w: variant(x, w, backend=backend, **options)
        return lambda x, w: mod.w4a16_matmul(x, w, backend=backend)

    return build


def _scaled(kernel: str, *, nk: bool = False, **options: Any) -> Callable[[str], Fn]:
    """W8A8 / FP8 rows (``kernel`` ``"w8a8"`` or ``"fp8"``) on ``(x, x_scale)``, ``(w, w_scale)``; ``nk``:
    the experimental ``*_nk`` kernel (weight ``(N, K)``); ``options`` for the kernel, not the
    reference (e.g. ``split_k``: the reference has no K ranges)."""

    def build(backend: str) -> Fn:
        ref = backend == "reference"
        mod = kernel_module("experimental.nk_layout" if nk else kernel)
        f = getattr(mod, f"{kernel}_matmul" + ("_nk" if nk else "") + ("_reference" if ref else ""))
        opts = {} if ref else {"backend": backend, **options}
        return lambda x, w: f(x[0], x[1], w[0], w[1], **opts)

    return build


def _quant_then_w8a8(backend: str) -> Fn:
    """``quantize_per_token`` of the bf16 activations, then W8A8."""
    aq, w8 = kernel_module("act_quant"), kernel_module("w8a8")
    ref = backend == "reference"
    quant = aq.quantize_per_token_reference if ref else aq.quantize_per_token
    matmul = w8.w8a8_matmul_reference if ref else w8.w8a8_matmul
    opts = {} if ref else {"backend": backend}

    def quant_then_matmul(x: jax.Array, w: Any) -> jax.Array:
        q, scale = quant(x, dtype=jnp.int8, **opts)
        return matmul(q, scale, w[0], w[1], **opts)

    return quant_then_matmul


def _hopper(kernel: str) -> Callable[[str], Fn]:
    """The experimental Hopper kernels on their prepared weights (``--backend gpu`` only)."""

    def build(backend: str) -> Fn:
        if kernel == "w4a16":  # weight prepared by hopper_w4.prepare_w4
            w4h = kernel_module("experimental.hopper_w4")
            return lambda x, w: w4h.w4a16_matmul_hopper(x, w)
        hop = kernel_module("experimental.hopper")  # operands as the main kernels check them
        acc = jnp.int32 if kernel == "w8a8" else jnp.float32
        return lambda x, w: hop.scaled_matmul_hopper(
            x[0],
            w[0],
            {"x_scale": x[1], "w_scale": w[1]},
            n=w[1].shape[1],
            acc_dtype=acc,
            out_dtype=jnp.bfloat16,
        )

    return build


ROWS = (
    Row("bf16", "bf16", "bf16", (), _bf16),
    Row("w4a16", "w4", "bf16", ("w4a16",), _w4a16()),
    Row("w4a16-swap", "w4", "bf16", ("w4a16", "experimental.w4a16_variants"), _w4a16(swap_ab=True)),
    Row("w8a8", "int8", "int8", ("w8a8",), _scaled("w8a8")),
    Row("w8a8+quant", "int8", "bf16", ("w8a8", "act_quant"), _quant_then_w8a8, arithmetic="int8"),
    Row("fp8", "fp8", "fp8", ("fp8",), _scaled("fp8")),
    Row("w8a8-nk", "int8-nk", "int8", ("experimental.nk_layout",), _scaled("w8a8", nk=True)),
    Row("fp8-nk", "fp8-nk", "fp8", ("experimental.nk_layout",), _scaled("fp8", nk=True)),
    Row("w8a8-xla", "int8", "int8", ("xla",), _xla_dot),
    Row("fp8-xla", "fp8", "fp8", ("xla",), _xla_dot),
    Row("w8a8-split1", "int8", "int8", ("w8a8",), _scaled("w8a8", split_k=1), max_m=16),
    Row("fp8-split1", "fp8", "fp8", ("fp8",), _scaled("fp8", split_k=1), max_m=16),
    Row("w8a8-mgpu", "int8-hopper", "int8", ("experimental.hopper",), _hopper("w8a8")),
    Row("fp8-mgpu", "fp8-hopper", "fp8", ("experimental.hopper",), _hopper("fp8")),
    Row("w4a16-mgpu", "w4-hopper", "bf16", ("experimental.hopper_w4",), _hopper("w4a16"), max_m=128),
)
KERNELS = tuple(row.name for row in ROWS)
BY_NAME = {row.name: row for row in ROWS}
# Pallas on Mosaic GPU: run with --backend gpu only
HOPPER_KERNELS = ("w8a8-mgpu", "fp8-mgpu", "w4a16-mgpu")
# XLA's native int8 / fp8 dot (qjax.kernels.xla.contract), XLA on every backend
XLA_KERNELS = ("w8a8-xla", "fp8-xla")
# Which weights and activations each kernel takes: kernels of one family share the same copies
# (-nk: the weight transposed once; -hopper: (N, K) padded to the tiles of the Hopper kernel, once)
WEIGHT_FAMILY = {row.name: row.weights for row in ROWS}
ACT_FAMILY = {row.name: row.activations for row in ROWS}
# The arithmetic each kernel does: its activations' format, except that w8a8+quant quantizes its
# bf16 activations to int8 first
ARITHMETIC = {row.name: row.arithmetic or row.activations for row in ROWS}
MODULES = {row.name: row.modules for row in ROWS if row.modules}
# kernels for small M only: no cells above (the -split1 rows differ from w8a8 / fp8 only where the
# grid is small enough for K to be split)
MAX_M = {row.name: row.max_m for row in ROWS if row.max_m is not None}
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


def missing_modules(kernel: str) -> list[str]:
    """The ``qjax.kernels`` modules ``kernel`` needs that cannot be imported."""
    missing = []
    for name in MODULES.get(kernel, ()):
        try:
            kernel_module(name)
        except ImportError:
            missing.append(f"qjax.kernels.{name}")
    return missing


def kernel_fn(kernel: str, backend: str) -> Fn:
    """``(activations, weights) -> (M, N) output`` of ``kernel``; ``backend="reference"`` calls the
    ``*_reference`` functions (XLA), any other backend the Pallas kernel built for it; the ``-xla``
    rows are XLA's own int8 / fp8 dot on every backend."""
    return BY_NAME[kernel].build(backend)
