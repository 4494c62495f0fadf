"""Hadamard matrices and the fast normalized Hadamard transform.

A Hadamard matrix of order :math:`n` has entries :math:`\\pm 1` and :math:`H H^\\top = n I`, so
:math:`H / \\sqrt{n}` is orthogonal: a change of basis that spreads every coordinate over all the
others (rotations for quantization: QuaRot, Ashkboos et al. 2024). One exists only for
:math:`n \\in \\{1, 2\\}` or :math:`4 \\mid n`. Those built here are Kronecker products of

* Sylvester's :math:`S_{2^k} = S_2^{\\otimes k}`, :math:`S_2 = \\begin{pmatrix} 1 & 1 \\\\ 1 & -1
  \\end{pmatrix}`, split into factors of at most :data:`MAX_SYLVESTER` (``S_{2^{a+b}} =
  S_{2^a} \\otimes S_{2^b}``);
* Paley I, order :math:`q + 1` for a prime :math:`q \\equiv 3 \\pmod 4`: with the Jacobsthal matrix
  :math:`Q_{ij} = \\chi(j - i)` (:math:`\\chi` the Legendre symbol mod :math:`q`; antisymmetric),
  :math:`S = \\begin{pmatrix} 0 & \\mathbf{1}^\\top \\\\ -\\mathbf{1} & Q \\end{pmatrix}` and
  :math:`H = I + S` (:math:`S^\\top = -S`, :math:`S S^\\top = q I`);
* Paley II, order :math:`2(q + 1)` for a prime :math:`q \\equiv 1 \\pmod 4`: with the symmetric
  :math:`C = \\begin{pmatrix} 0 & \\mathbf{1}^\\top \\\\ \\mathbf{1} & Q \\end{pmatrix}`,
  :math:`H = C \\otimes S_2 + I \\otimes \\begin{pmatrix} 1 & -1 \\\\ -1 & -1 \\end{pmatrix}`.

:func:`hadamard_factors` writes :math:`n = 2^k r` (:math:`r` odd) as Paley orders :math:`2^{j_i} o_i`
with :math:`\\prod o_i = r` and :math:`\\sum j_i \\le k` times Sylvester factors for the remaining
power of two, choosing the plan with the smallest sum of factor orders (the transform's cost per
element): ``576 = 12 * 12 * 4``, ``1536 = 12 * 128``. :func:`hadamard_transform` applies
:math:`x H / \\sqrt{n}` factor by factor in :math:`O(n \\sum_i f_i)` instead of :math:`O(n^2)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_SYLVESTER = 128
"""Largest Sylvester factor of :func:`hadamard_factors`: larger powers of two are split."""


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


@functools.cache
def _paley_twos(odd: int, most: int) -> int | None:
    """The smallest ``j`` in ``2..most`` with a Paley matrix of order ``2^j * odd``, or ``None``."""
    for j in range(2, most + 1):
        if _is_prime(2**j * odd - 1) or (j == 2 and _is_prime(2 * odd - 1)):
            return j
    return None


def _sylvester_orders(k: int) -> tuple[int, ...]:
    """``2^k`` as near-equal powers of two, none above :data:`MAX_SYLVESTER`."""
    if k == 0:
        return ()
    chunks = -(-k // int(math.log2(MAX_SYLVESTER)))
    return tuple(2 ** (k // chunks + (i < k % chunks)) for i in range(chunks))


@functools.cache
def _plan(odd: int, k: int) -> tuple[int, ...] | None:
    """The cheapest factor orders for ``odd * 2^k`` (Paley ones first, ascending), or ``None``."""
    if odd == 1:
        return _sylvester_orders(k)
    if k < 2:
        return None  # an order above 2 is a multiple of 4
    best: tuple[int, ...] | None = None
    for o in range(3, odd + 1, 2):
        if odd % o:
            continue
        j = _paley_twos(o, k)
        rest = None if j is None else _plan(odd // o, k - j)
        if j is None or rest is None:
            continue
        paley = sorted([2**j * o, *(f for f in rest if f & (f - 1))])
        plan = (*paley, *(f for f in rest if not f & (f - 1)))
        if best is None or sum(plan) < sum(best):
            best = plan
    return best


def _split(n: int) -> tuple[int, int]:
    k = (n & -n).bit_length() - 1
    return n >> k, k


def is_hadamard_order(n: int) -> bool:
    """Whether :func:`hadamard` builds a Hadamard matrix of order ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return False
    return _plan(*_split(n)) is not None


def _nearest_orders(n: int) -> tuple[int | None, int]:
    below = next((m for m in range(n - 1, 0, -1) if is_hadamard_order(m)), None)
    above = next(m for m in range(n + 1, 2 * n + 2) if is_hadamard_order(m))
    return below, above


def hadamard_factors(n: int) -> tuple[int, ...]:
    """The orders of the Kronecker factors of :func:`hadamard` ``(n)``: Paley orders ascending, then
    Sylvester powers of two (``()`` for ``n = 1``). Raises ``ValueError`` naming the nearest orders
    that are built when there is none for ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: a Hadamard order is a positive integer")
    plan = _plan(*_split(n))
    if plan is None:
        below, above = _nearest_orders(n)
        nearest = f"{below} or {above}" if below is not None else str(above)
        raise ValueError(
            f"no Hadamard matrix of order n={n} is built here: orders are 1, 2 and 2^k * m with m a "
            "product of Paley orders (q + 1 for a prime q = 3 mod 4, 2(q + 1) for a prime q = 1 mod 4: "
            f"12, 20, 28, 36, 44, 60, ...; none exists unless n is 1, 2 or a multiple of 4); the nearest "
            f"built are {nearest}: pad the dimension to one of them"
        )
    return plan


def _legendre(q: int) -> np.ndarray:
    """:math:`\\chi(a)` for ``a`` in ``0..q-1``: 0, +1 (a nonzero square mod q) or -1."""
    chi = -np.ones(q, np.int64)
    chi[0] = 0
    chi[[(x * x) % q for x in range(1, q)]] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    i = np.arange(q)
    return _legendre(q)[(i[None, :] - i[:, None]) % q]  # Q_ij = chi(j - i)


@functools.cache
def _factor(order: int) -> np.ndarray:
    """The integer Hadamard matrix of one factor order (Sylvester or Paley I / II)."""
    if not order & (order - 1):
        h = np.ones((1, 1), np.int64)
        for _ in range(order.bit_length() - 1):
            h = np.block([[h, h], [h, -h]])
        return h
    ones = np.ones((1, order - 1), np.int64)
    if _is_prime(order - 1) and (order - 1) % 4 == 3:  # Paley I
        s = np.block([[np.zeros((1, 1), np.int64), ones], [-ones.T, _jacobsthal(order - 1)]])
        return np.eye(order, dtype=np.int64) + s
    q = order // 2 - 1  # Paley II
    half = np.ones((1, q), np.int64)
    c = np.block([[np.zeros((1, 1), np.int64), half], [half.T, _jacobsthal(q)]])
    return np.kron(c, _factor(2)) + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]]))


def hadamard(n: int) -> np.ndarray:
    """The (n, n) int64 Hadamard matrix :math:`H_n = \\bigotimes_i H_{f_i}` over
    :func:`hadamard_factors` ``(n)``: entries :math:`\\pm 1`, :math:`H_n H_n^\\top = n I` exactly.
    Row :math:`a` of :math:`H_{f_1} \\otimes H_{f_2}` is :math:`a = a_1 f_2 + a_2` (row-major)."""
    h = np.ones((1, 1), np.int64)
    for f in hadamard_factors(n):
        h = np.kron(h, _factor(f))
    return h


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """A randomized orthogonal Hadamard rotation, (n, n) float64:

    .. math::

        Q = \\operatorname{diag}(s)\\, H_n / \\sqrt{n}, \\qquad s_i \\in \\{\\pm 1\\}
        \\text{ uniform, from } \\texttt{seed}

    :math:`Q Q^\\top = I`. For row vectors, :math:`x Q` flips the signs of :math:`x` and then mixes
    the coordinates (signs flipped after the mixing would leave every magnitude of :math:`x H_n`
    as it is)."""
    h = hadamard(n)
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)
    return signs[:, None] * h / math.sqrt(n)


def hadamard_transform(x: jax.Array) -> jax.Array:
    """:math:`x H_n / \\sqrt{n}` along the last axis of ``x`` (..., n), :math:`H_n` =
    :func:`hadamard` ``(n)``, without forming :math:`H_n`: ``x`` is viewed as
    (..., f_1, ..., f_t) and each axis is multiplied by its factor :math:`H_{f_i}`. Orthogonal:
    applying it with :math:`H_n^\\top` (``x @ hadamard(n).T / sqrt(n)``) undoes it. Each factor is
    applied normalized (:math:`H_{f_i} / \\sqrt{f_i}`, orthogonal), so no intermediate exceeds
    :math:`\\lVert x \\rVert_2`. Computed in float32 at least (``x`` in float64 stays float64),
    returned in ``x.dtype``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"hadamard_transform needs a floating x; got {x.dtype}: cast it first")
    if x.ndim == 0:
        raise ValueError("hadamard_transform needs x with a last axis (..., n); got a scalar")
    n = x.shape[-1]
    factors = hadamard_factors(n)
    compute = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    lead = x.ndim - 1
    y = x.astype(compute).reshape(*x.shape[:-1], *factors)
    for i, f in enumerate(factors):
        h = jnp.asarray(_factor(f) / math.sqrt(f), compute)  # (f, f), orthogonal
        y = jnp.tensordot(y, h, axes=((lead + i,), (0,)), precision=jax.lax.Precision.HIGHEST)
        y = jnp.moveaxis(y, -1, lead + i)
    return y.reshape(x.shape).astype(x.dtype)


__all__ = [
    "MAX_SYLVESTER",
    "hadamard",
    "hadamard_factors",
    "hadamard_transform",
    "is_hadamard_order",
    "random_hadamard",
]
