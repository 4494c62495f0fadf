"""Which compiler a Pallas kernel of qjax is built for, and which of its bodies runs.

A kernel is built for one :class:`Backend`: ``gpu`` (Pallas on Triton), ``tpu`` (Pallas on Mosaic)
or ``interpret`` (the Pallas interpreter: any device, used on CPU and in the tests).
:func:`resolve_backend` parses a kernel's ``backend=`` argument once: ``None`` is the default
device's platform, ``cuda`` / ``rocm`` alias ``gpu`` and ``cpu`` aliases ``interpret``. Lowering
for a platform other than the host's (``jax.jit(f).trace(*args).lower(lowering_platforms=
("cuda",))`` on a CPU machine) needs ``backend=`` named, since the default is the host's.

A matmul kernel has a GPU and a TPU :class:`Body`; the interpreter runs the GPU body unless a test
names the other (``body=``).
"""

from __future__ import annotations

import enum

import jax


class Backend(enum.StrEnum):
    GPU = "gpu"  # Pallas on Triton
    TPU = "tpu"  # Pallas on Mosaic
    INTERPRET = "interpret"  # the Pallas interpreter, any device


class Body(enum.StrEnum):
    GPU = "gpu"  # a grid over K ranges, a fori_loop over K steps, masked rows (Triton)
    TPU = "tpu"  # a grid over K steps with a VMEM accumulator (Mosaic)


ALIASES: dict[str, Backend] = {
    **{b.value: b for b in Backend},
    "cuda": Backend.GPU,
    "rocm": Backend.GPU,
    "cpu": Backend.INTERPRET,
}
EXPERIMENTAL_BACKENDS = {
    "mosaic_gpu": "the Hopper kernels (Pallas on Mosaic GPU) are qjax.kernels.experimental.hopper "
    "(w8a8_matmul_hopper, int8_matmul_hopper, fp8_matmul_hopper) and qjax.kernels.experimental.hopper_w4",
}


def resolve_backend(backend: Backend | str | None = None) -> Backend:
    """The :class:`Backend` of a kernel's ``backend=`` argument (``None``: the default device's)."""
    name = jax.default_backend() if backend is None else backend
    if name in EXPERIMENTAL_BACKENDS:
        raise ValueError(
            f"backend={backend!r}: the main kernels have no {name!r} backend; {EXPERIMENTAL_BACKENDS[name]}"
        )
    if name not in ALIASES:
        raise ValueError(
            f"backend={backend!r} is not one of {sorted(ALIASES)}; pass 'gpu' (Triton), 'tpu' "
            "(Mosaic) or 'interpret' (the Pallas interpreter, any device), or None for the default device"
        )
    return ALIASES[name]


def resolve_body(body: Body | str | None, backend: Backend, interpreted: Body = Body.GPU) -> Body:
    """``body``, or the backend's: the TPU body on ``tpu``, the GPU body on ``gpu``, ``interpreted``
    on the interpreter."""
    if body is None:
        return {Backend.GPU: Body.GPU, Backend.TPU: Body.TPU}.get(backend, interpreted)
    if body not in tuple(Body):
        raise ValueError(f"body={body!r}: expected 'gpu' or 'tpu'")
    return Body(body)
