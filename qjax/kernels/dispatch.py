"""Which implementation a served (converted) layer's contraction runs on.

:func:`serve_dot_general` is what ``serve`` mode of :mod:`qjax.nn` calls for Linear and Einsum
layers. It picks, per call (at trace time), one :class:`KernelPath`:

* ``pallas``: the Pallas kernels of this package for the current backend (Triton on GPU, Mosaic
  on TPU, the Pallas interpreter on CPU),
* ``xla``: the integer / fp8 / dequantize-then-compute path of :mod:`qjax.kernels.xla`,
* ``reference``: the pure-jnp ``*_reference`` of the kernel that ``pallas`` would run, for
  debugging a kernel against its reference inside a model,
* ``mosaic_gpu``: as ``pallas``, but W8A8 and FP8 on the experimental Hopper kernels
  (:mod:`qjax.kernels.experimental.hopper`, Pallas on Mosaic GPU; sm_90 GPUs only; imported only
  on this path),

``auto`` (the default) being ``pallas`` on GPU and TPU and ``xla`` on CPU. Served layers pass their
rule's ``kernels`` field (:class:`qjax.nn.Rule`, set for a whole model by
:func:`qjax.nn.set_kernels`), which is static, so a jitted model retraces when it changes. A
contraction the kernels do not cover runs on ``xla`` whatever the path (:func:`kernel_plan` says
which kernel covers it, if any):

* **W8A8** (:func:`~qjax.kernels.w8a8.w8a8_matmul`): integer activations (int8 or uint8; per
  tensor or per token; any zero point) x symmetric int8 weights per output channel or per tensor;
* **FP8** (:func:`~qjax.kernels.fp8.fp8_matmul`): e4m3 x e4m3, per-tensor or per-row / per-column
  scales;
* **block-scaled FP8** (:func:`~qjax.kernels.fp8_block.fp8_block_matmul`): e4m3 activations
  quantized per token in groups of 128 along the contraction x e4m3 weights in 128 x 128 blocks,
  K and N multiples of 128 (on the ``mosaic_gpu`` path it runs on Triton);
* **W4A16** (:func:`~qjax.kernels.w4a16.w4a16_matmul`): float activations x int4 weights per output
  channel or in groups of 32/64/128 along the contraction axis, symmetric or with zero points
  (on the ``mosaic_gpu`` path on Triton);

each for a contraction of the activations' last axis with the weight's first, the weight 2-D and
no batch axes. Integer weights are stored by :func:`qjax.nn.convert` as a
:class:`~qjax.numerics.QArray` packed along the output axis; W4A16 repacks them along the
contraction axis (:func:`~qjax.kernels.w4a16.pack_w4`) on every call unless the layer holds the
kernel's layout already (:func:`prepare_w4a16`, stored by :func:`qjax.nn.prepare_kernels`). A
prepared ``(N, K)`` copy of an 8-bit weight
(:func:`qjax.kernels.experimental.nk_layout.prepare_nk`, ``prepare_kernels(model,
w8_layout="nk")``) is read by the experimental ``*_nk`` kernels.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qjax.kernels import xla
from qjax.kernels.common import KN
from qjax.kernels.fp8 import fp8_matmul, fp8_matmul_reference
from qjax.kernels.fp8_block import fp8_block_matmul, fp8_block_matmul_reference
from qjax.kernels.w4a16 import PackedW4, pack_w4, w4a16_matmul, w4a16_matmul_reference
from qjax.kernels.w8a8 import w8a8_matmul, w8a8_matmul_reference
from qjax.numerics import QArray
from qjax.numerics.formats import FloatFormat, IntFormat


class KernelPath(enum.StrEnum):
    AUTO = "auto"  # pallas on GPU and TPU, xla on CPU
    PALLAS = "pallas"
    XLA = "xla"
    REFERENCE = "reference"
    MOSAIC_GPU = "mosaic_gpu"  # experimental: the Hopper kernels for W8A8 and FP8


KERNEL_PATHS = tuple(p.value for p in KernelPath)


def check_kernel_path(path: KernelPath | str) -> KernelPath:
    """``path`` as a :class:`KernelPath`; a ``ValueError`` naming the paths if it is none."""
    if path not in KERNEL_PATHS:
        raise ValueError(f"kernels={path!r} is not one of {list(KERNEL_PATHS)}")
    return KernelPath(path)


def resolved_kernel_path(path: KernelPath | str = KernelPath.AUTO) -> KernelPath:
    """``path`` with ``auto`` resolved for the default backend (``xla`` on CPU, else ``pallas``)."""
    if check_kernel_path(path) == KernelPath.AUTO:
        return KernelPath.XLA if jax.default_backend() == "cpu" else KernelPath.PALLAS
    return KernelPath(path)


class KernelPlan(NamedTuple):
    """A contraction a kernel covers: ``kernel`` (``"w8a8"``, ``"fp8"``, ``"fp8_block"`` or
    ``"w4a16"``) and the call ``run(path)`` with ``path`` one of ``pallas``, ``mosaic_gpu`` or
    ``reference``, returning ``(M, N)``."""

    kernel: str
    run: Callable[[KernelPath], jax.Array]


def _is_plain_matmul(x_ndim: int, w: QArray, dimension_numbers: Any) -> bool:
    (lc, rc), (lb, rb) = dimension_numbers
    return (
        len(w.shape) == 2
        and not tuple(lb)
        and not tuple(rb)
        and tuple(lc) in ((x_ndim - 1,), (-1,))
        and tuple(rc) in ((0,), (-2,))
    )


def _rows(a: jax.Array | None, m: int) -> jax.Array | None:
    """A per-tensor or per-row parameter grid of the activations as ``(1, 1)`` or ``(M, 1)``."""
    if a is None:
        return None
    return a.reshape(1, 1) if a.size == 1 else a.reshape(m, 1)


def _columns(s: jax.Array, n: int) -> jax.Array | None:
    """A weight scale grid with one value per tensor or per output column as ``(1, N)``; else None."""
    if s.shape == (1, n) or s.size == 1:
        return jnp.broadcast_to(s.reshape(1, -1), (1, n)).astype(jnp.float32)
    return None


def _activation_rows(x: QArray, m: int) -> bool:
    """Whether ``x``'s parameters are per tensor or one per row (token) of its ``(M, K)`` view."""
    s = x.qparams.scale
    return s.size == 1 or (s.shape[-1] == 1 and s.size == m)


Prepared = PackedW4 | jax.Array  # a weight in a kernel's layout: W4A16's packing, or (N, K) 8-bit
_PREPARE_AGAIN = "prepare it again from this weight (qjax.nn.prepare_kernels) after changing the weights"


def _nk_weight(prepared: jax.Array | None, w: jax.Array, k: int, n: int) -> tuple[jax.Array, bool]:
    """The weight operand and whether it is a prepared ``(N, K)`` copy."""
    if prepared is None:
        return w, False
    if prepared.shape != (n, k):
        raise ValueError(
            f"the prepared (N, K) weight has shape {tuple(prepared.shape)} but the layer's weight is "
            f"{k} x {n}; {_PREPARE_AGAIN}"
        )
    return prepared, True


def _eight_bit_kernels(kernel: str, nk: bool) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """The Pallas kernel and the reference of ``kernel`` (``"w8a8"``, ``"fp8"``, ``"fp8_block"``) for a
    weight ``(K, N)``, or with ``nk`` for a prepared ``(N, K)`` copy: the experimental ``*_nk`` kernels,
    imported here, by the call that needs them."""
    kernels: dict[str, tuple[Callable[..., jax.Array], Callable[..., jax.Array]]]
    if not nk:
        kernels = {
            "w8a8": (w8a8_matmul, w8a8_matmul_reference),
            "fp8": (fp8_matmul, fp8_matmul_reference),
            "fp8_block": (fp8_block_matmul, fp8_block_matmul_reference),
        }
        return kernels[kernel]
    from qjax.kernels.experimental import nk_layout

    kernels = {
        "w8a8": (nk_layout.w8a8_matmul_nk, nk_layout.w8a8_matmul_nk_reference),
        "fp8": (nk_layout.fp8_matmul_nk, nk_layout.fp8_matmul_nk_reference),
        "fp8_block": (nk_layout.fp8_block_matmul_nk, nk_layout.fp8_block_matmul_nk_reference),
    }
    return kernels[kernel]


def _run_eight_bit(
    kernel: str, path: KernelPath, nk: bool, args: tuple[Any, ...], kw: dict[str, Any]
) -> jax.Array:
    """An 8-bit ``kernel`` on ``path``: ``mosaic_gpu`` runs W8A8 and FP8 on the experimental Hopper
    kernels (imported here) and block-scaled FP8 on Triton."""
    if path == KernelPath.MOSAIC_GPU and kernel in ("w8a8", "fp8"):
        from qjax.kernels.experimental import hopper, nk_layout

        hopper_kernel = hopper.w8a8_matmul_hopper if kernel == "w8a8" else hopper.fp8_matmul_hopper
        return hopper_kernel(*args, layout=nk_layout.NK if nk else KN, **kw)
    pallas, reference = _eight_bit_kernels(kernel, nk)
    if path == KernelPath.REFERENCE:
        return reference(*args, **kw)
    return pallas(*args, backend="gpu" if path == KernelPath.MOSAIC_GPU else None, **kw)


def _w8a8_plan(
    x: QArray, w: QArray, m: int, k: int, n: int, out_dtype: Any, prepared: jax.Array | None
) -> KernelPlan | None:
    fx, fw = x.spec.format, w.spec.format
    if not (isinstance(fx, IntFormat) and isinstance(fw, IntFormat)) or fx.bits > 8 or fw.bits != 8:
        return None
    if not fw.signed or w.zero_point is not None or not _activation_rows(x, m):
        return None
    w_scale = _columns(w.qparams.scale, n)
    if w_scale is None:
        return None
    xo, wo = xla.operand(x), xla.operand(w)
    x_scale = _rows(xo.scale, m)
    assert x_scale is not None
    zp = _rows(xo.zero_point, m)
    zp = None if zp is None else jnp.broadcast_to(zp, x_scale.shape).astype(jnp.int32)
    w_values, nk = _nk_weight(prepared, wo.values, k, n)
    args = (xo.values.reshape(m, k), x_scale, w_values, w_scale)
    kw = dict(x_zero_point=zp, out_dtype=out_dtype)
    return KernelPlan("w8a8", functools.partial(_run_eight_bit, "w8a8", nk=nk, args=args, kw=kw))


def _fp8_plan(
    x: QArray, w: QArray, m: int, k: int, n: int, out_dtype: Any, prepared: jax.Array | None
) -> KernelPlan | None:
    fx, fw = x.spec.format, w.spec.format
    e4m3 = jnp.dtype(jnp.float8_e4m3fn)
    if not (isinstance(fx, FloatFormat) and isinstance(fw, FloatFormat)):
        return None
    if x.data.dtype != e4m3 or w.data.dtype != e4m3 or not _activation_rows(x, m):
        return None
    w_scale = _columns(w.qparams.scale, n)
    if w_scale is None:
        return None
    x_scale = _rows(x.qparams.scale.astype(jnp.float32), m)
    assert x_scale is not None
    w_values, nk = _nk_weight(prepared, w.data, k, n)
    args = (x.data.reshape(m, k), x_scale, w_values, w_scale)
    kw = dict(out_dtype=out_dtype)
    return KernelPlan("fp8", functools.partial(_run_eight_bit, "fp8", nk=nk, args=args, kw=kw))


def _fp8_block_plan(
    x: QArray, w: QArray, m: int, k: int, n: int, out_dtype: Any, prepared: jax.Array | None
) -> KernelPlan | None:
    """E4M3 activations in groups of 128 along K (per token) x e4m3 weights in 128 x 128 blocks."""
    e4m3 = jnp.dtype(jnp.float8_e4m3fn)
    if x.data.dtype != e4m3 or w.data.dtype != e4m3 or k % 128 or n % 128:
        return None
    xs, ws = x.spec, w.spec
    if ws.granularity != "per_block" or tuple(ws.block_shape or ()) != (128, 128):
        return None
    if xs.granularity != "per_group" or xs.group_size != 128 or xs.axis not in (-1, len(x.shape) - 1):
        return None
    g = k // 128
    if x.qparams.scale.size != m * g or w.qparams.scale.shape != (g, n // 128):
        return None
    w_values, nk = _nk_weight(prepared, w.data, k, n)
    args = (
        x.data.reshape(m, k),
        x.qparams.scale.astype(jnp.float32).reshape(m, g),
        w_values,
        w.qparams.scale.astype(jnp.float32),
    )
    kw = dict(out_dtype=out_dtype)
    return KernelPlan("fp8_block", functools.partial(_run_eight_bit, "fp8_block", nk=nk, args=args, kw=kw))


def _w4_group(w: QArray, k: int, n: int) -> int | None:
    """The group size along K of a weight scale grid ``(K // g, N)`` (per channel: one group of K)."""
    groups = w.qparams.scale.shape[0]
    if w.qparams.scale.shape != (groups, n) or k % groups:
        return None
    g = k // groups
    return g if g in (32, 64, 128) or (groups == 1 and g % 128 == 0) else None


def w4a16_operands(w: QArray) -> tuple[jax.Array, jax.Array, jax.Array | None, int] | None:
    """``(codes, scales, zeros, group_size)``, the arguments of :func:`pack_w4`, of a served 2-D
    4-bit weight ``(K, N)`` that the W4A16 kernel covers; ``None`` if it does not."""
    fw = w.spec.format
    if len(w.shape) != 2 or not isinstance(fw, IntFormat) or fw.bits != 4:
        return None
    k, n = w.shape
    g = _w4_group(w, k, n)
    if g is None:
        return None
    values = w.values.astype(jnp.int32)
    scales = w.qparams.scale.astype(jnp.float32)
    zeros = None
    if w.zero_point is not None or not fw.signed:  # codes onto [0, 15] with the zero point beside them
        offset = 8 if fw.signed else 0
        z = jnp.zeros_like(scales) if w.zero_point is None else w.zero_point.astype(jnp.float32)
        values, zeros = values + offset, z + offset
    group_size = g if g <= 128 else 128
    if group_size != g:  # one scale per channel: repeat it for every group of 128
        scales = jnp.repeat(scales, g // 128, axis=0)
        zeros = None if zeros is None else jnp.repeat(zeros, g // 128, axis=0)
    return values, scales, zeros, group_size


def prepare_w4a16(w: QArray) -> PackedW4 | None:
    """The W4A16 kernel's packed weight of a served 4-bit weight (``None`` if the kernel does not
    cover it): what a call would pack, made once."""
    operands = w4a16_operands(w)
    if operands is None:
        return None
    values, scales, zeros, group_size = operands
    return pack_w4(values, scales, zeros, group_size=group_size)


def _w4a16_plan(
    x: jax.Array, w: QArray, m: int, k: int, n: int, out_dtype: Any, prepared: PackedW4 | None
) -> KernelPlan | None:
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return None
    operands = w4a16_operands(w) if prepared is None else None
    if prepared is None and operands is None:
        return None
    if prepared is not None and (prepared.k, prepared.n) != (k, n):
        raise ValueError(
            f"the prepared W4A16 weight is {prepared.k} x {prepared.n} but the layer's weight is {k} x {n}; "
            + _PREPARE_AGAIN
        )
    xs = x.reshape(m, k)

    def run(path: KernelPath) -> jax.Array:
        if prepared is not None:
            packed = prepared
        else:
            assert operands is not None
            values, scales, zeros, group_size = operands
            packed = pack_w4(values, scales, zeros, group_size=group_size)
        if path == KernelPath.REFERENCE:
            return w4a16_matmul_reference(xs, packed, out_dtype=out_dtype)
        backend = "gpu" if path == KernelPath.MOSAIC_GPU else None  # no Hopper W4A16 on this path
        return w4a16_matmul(xs, packed, out_dtype=out_dtype, backend=backend)

    return KernelPlan("w4a16", run)


def kernel_plan(
    x: jax.Array | QArray,
    w: QArray,
    dimension_numbers: Any,
    out_dtype: Any = jnp.float32,
    prepared: Prepared | None = None,
) -> KernelPlan | None:
    """The kernel that covers ``dot_general(x, w, dimension_numbers)``, or None (see the module
    docstring). ``prepared``: ``w`` in its kernel's layout, used instead of ``w``'s own: the W4A16
    packing (:func:`prepare_w4a16`, not repacked in the call) or an ``(N, K)`` 8-bit copy
    (:func:`qjax.kernels.experimental.nk_layout.prepare_nk`, read by the experimental ``*_nk``
    kernels)."""
    x_shape: Sequence[int] = x.shape
    if not isinstance(w, QArray) or w.spec.format.container_bits > 8 or not len(x_shape):
        return None
    if not _is_plain_matmul(len(x_shape), w, dimension_numbers):
        return None
    k, n = w.shape
    m = 1
    for d in x_shape[:-1]:
        m *= d
    if isinstance(x, QArray):
        if w.spec.format.container_bits == 4:
            return None
        nk = prepared if isinstance(prepared, jax.Array) else None
        return (
            _w8a8_plan(x, w, m, k, n, out_dtype, nk)
            or _fp8_plan(x, w, m, k, n, out_dtype, nk)
            or _fp8_block_plan(x, w, m, k, n, out_dtype, nk)
        )
    return _w4a16_plan(x, w, m, k, n, out_dtype, prepared if isinstance(prepared, PackedW4) else None)


def serve_dot_general(
    x: jax.Array | QArray,
    w: QArray,
    dimension_numbers: Any,
    *,
    out_dtype: Any = jnp.float32,
    path: KernelPath | str = KernelPath.AUTO,
    prepared: Prepared | None = None,
) -> jax.Array:
    """``lax.dot_general(x, w)`` of a served layer on the kernel path in force (module docstring);
    ``prepared`` as in :func:`kernel_plan` (the XLA path does not use it)."""
    resolved = resolved_kernel_path(path)
    plan = None if resolved == KernelPath.XLA else kernel_plan(x, w, dimension_numbers, out_dtype, prepared)
    if plan is None:
        return xla.quantized_dot_general(x, w, dimension_numbers, out_dtype=out_dtype)
    y = plan.run(resolved)
    return y.reshape(*x.shape[:-1], w.shape[1]).astype(out_dtype)
