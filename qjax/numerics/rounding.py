"""Rounding onto an integer grid or onto a low-precision float grid.

* ``nearest``: round half to even (IEEE default, what a cast does).
* ``floor`` / ``ceil``: towards -inf / +inf; biased by -1/2 and +1/2 step on average.
* ``stochastic``: :math:`\\lfloor y + u \\rfloor` with :math:`u \\sim U[0, 1)`, so that
  :math:`\\mathbb{E}[\\operatorname{round}(y)] = y` and the result is one of the two neighbours.

A float grid with ``m`` mantissa bits and smallest normal exponent ``e_min`` has, around ``y``,
the step :math:`2^{\\max(\\lfloor\\log_2|y|\\rfloor, e_{min}) - m}`; rounding ``y`` onto it is
integer rounding of ``y / step`` (an exact power-of-two rescaling), so every mode above applies to
fp8 and fp4 exactly as to integers.

**Plug-ins.** A rounding scheme is a :class:`RoundingScheme`: a function ``round(y, noise)`` from
scaled float32 values to integers (still as floats, same shape), elementwise, and whether it needs
``noise``, U[0, 1) draws of ``y``'s shape made from the caller's PRNG key (so a spec that names it
needs a key, as ``stochastic`` does). :func:`register_rounding` adds one; ``QuantSpec(rounding=name)``
then accepts its name, and every format rounds through it (integer and float grids). The built-ins
above are registered the same way.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qjax.numerics.registry import Registry


class Rounding(enum.StrEnum):
    """The built-in rounding schemes (a spec also takes a registered plug-in's name)."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"
    FLOOR = "floor"
    CEIL = "ceil"


@dataclasses.dataclass(frozen=True)
class RoundingScheme:
    """A registered rounding scheme.

    Attributes:
      round: ``round(y, noise) -> integers as floats``, elementwise on float32 ``y``; ``noise`` is
        ``None`` unless ``needs_noise``.
      needs_noise: the scheme draws on U[0, 1) ``noise`` of ``y``'s shape (the spec needs a key).
    """

    round: Callable[[jax.Array, jax.Array | None], jax.Array]
    needs_noise: bool = False


ROUNDINGS: Registry[RoundingScheme] = Registry("rounding scheme", "rounding")


def register_rounding(
    name: str,
    fn: Callable[[jax.Array, jax.Array | None], jax.Array],
    *,
    needs_noise: bool = False,
    override: bool = False,
) -> RoundingScheme:
    """Register the rounding scheme ``name``: ``fn(y, noise)`` maps scaled float32 values to
    integers (as floats); ``needs_noise=True`` passes it U[0, 1) draws of ``y``'s shape (specs that
    use it then need a PRNG key). Raises ``ValueError`` for a name already registered unless
    ``override=True`` (built-in names are reserved).

    .. code-block:: python

        half_away = lambda y, noise: jnp.sign(y) * jnp.floor(jnp.abs(y) + 0.5)
        qjax.numerics.register_rounding("half_away", half_away)
        spec = qjax.QuantSpec(dtype="int4", rounding="half_away")
    """
    if not callable(fn):
        raise TypeError(f"register_rounding({name!r}, fn): fn must be callable; got {type(fn).__name__}")
    return ROUNDINGS.register(name, RoundingScheme(fn, bool(needs_noise)), override=override)


def _stochastic(y: jax.Array, noise: jax.Array | None) -> jax.Array:
    if noise is None:
        raise ValueError("rounding='stochastic' needs uniform noise; pass key=jax.random.key(...)")
    return jnp.floor(y + noise)


ROUNDINGS.register(Rounding.NEAREST.value, RoundingScheme(lambda y, noise: jnp.round(y)))
ROUNDINGS.register(Rounding.STOCHASTIC.value, RoundingScheme(_stochastic, needs_noise=True))
ROUNDINGS.register(Rounding.FLOOR.value, RoundingScheme(lambda y, noise: jnp.floor(y)))
ROUNDINGS.register(Rounding.CEIL.value, RoundingScheme(lambda y, noise: jnp.ceil(y)))
ROUNDINGS.seal()


def needs_key(rounding: str) -> bool:
    """Whether the rounding scheme ``rounding`` draws random numbers (a spec using it needs a key)."""
    return ROUNDINGS.get(rounding).needs_noise


def round_to_integer(y: jax.Array, rounding: str, noise: jax.Array | None = None) -> jax.Array:
    """Round ``y`` to integers (still as floats) by the scheme ``rounding``; ``noise`` ~ U[0, 1) is
    needed by the schemes that draw on it (``stochastic``)."""
    return ROUNDINGS.get(rounding).round(y, noise)


def round_to_float_grid(
    y: jax.Array, mantissa_bits: int, min_exponent: int, rounding: str, noise: jax.Array | None
) -> jax.Array:
    """Round float32 ``y`` onto the grid of a float format (no saturation: the caller clips)."""
    _, exponent = jnp.frexp(y)  # y = f * 2**exponent with |f| in [0.5, 1)
    step_exponent = jnp.maximum(exponent - 1, min_exponent) - mantissa_bits
    return jnp.ldexp(round_to_integer(jnp.ldexp(y, -step_exponent), rounding, noise), step_exponent)


def uniform_noise(key: jax.Array | None, shape: tuple[int, ...], rounding: str) -> jax.Array | None:
    """The U[0, 1) draws stochastic rounding (or a plug-in scheme that asks for noise) needs, or
    ``None`` for deterministic schemes."""
    if not needs_key(rounding):
        return None
    if key is None:
        raise ValueError(
            f"rounding={str(rounding)!r} needs a PRNG key; pass key=jax.random.key(seed) "
            "or choose rounding='nearest'"
        )
    return jax.random.uniform(key, shape, jnp.float32)
