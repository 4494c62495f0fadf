"""Rounding onto an integer grid or onto a low-precision float grid.

* ``nearest``: round half to even (IEEE default, what a cast does).
* ``floor`` / ``ceil``: towards -inf / +inf; biased by -1/2 and +1/2 step on average.
* ``stochastic``: :math:`\\lfloor y + u \\rfloor` with :math:`u \\sim U[0, 1)`, so that
  :math:`\\mathbb{E}[\\operatorname{round}(y)] = y` and the result is one of the two neighbours.

A float grid with ``m`` mantissa bits and smallest normal exponent ``e_min`` has, around ``y``,
the step :math:`2^{\\max(\\lfloor\\log_2|y|\\rfloor, e_{min}) - m}`; rounding ``y`` onto it is
integer rounding of ``y / step`` (an exact power-of-two rescaling), so every mode above applies to
fp8 and fp4 exactly as to integers.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp


class Rounding(enum.StrEnum):
    NEAREST = "nearest"
    STOCHASTIC = "stochastic"
    FLOOR = "floor"
    CEIL = "ceil"


def round_to_integer(y: jax.Array, rounding: str, noise: jax.Array | None = None) -> jax.Array:
    """Round ``y`` to integers (still as floats). ``noise`` ~ U[0, 1) is needed for stochastic."""
    if rounding == Rounding.NEAREST:
        return jnp.round(y)
    if rounding == Rounding.FLOOR:
        return jnp.floor(y)
    if rounding == Rounding.CEIL:
        return jnp.ceil(y)
    if noise is None:
        raise ValueError("rounding='stochastic' needs uniform noise; pass key=jax.random.key(...)")
    return jnp.floor(y + noise)


def round_to_float_grid(
    y: jax.Array, mantissa_bits: int, min_exponent: int, rounding: str, noise: jax.Array | None
) -> jax.Array:
    """Round float32 ``y`` onto the grid of a float format (no saturation: the caller clips)."""
    _, exponent = jnp.frexp(y)  # y = f * 2**exponent with |f| in [0.5, 1)
    step_exponent = jnp.maximum(exponent - 1, min_exponent) - mantissa_bits
    return jnp.ldexp(round_to_integer(jnp.ldexp(y, -step_exponent), rounding, noise), step_exponent)


def uniform_noise(key: jax.Array | None, shape: tuple[int, ...], rounding: str) -> jax.Array | None:
    """The U[0, 1) draws stochastic rounding needs, or ``None`` for deterministic modes."""
    if rounding != Rounding.STOCHASTIC:
        return None
    if key is None:
        raise ValueError(
            "rounding='stochastic' needs a PRNG key; pass key=jax.random.key(seed) "
            "or choose rounding='nearest'"
        )
    return jax.random.uniform(key, shape, jnp.float32)
