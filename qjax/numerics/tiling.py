"""Granularity as one mechanism: the tensor is tiled into blocks that share one scale.

A *block shape* ``b`` has one extent per axis of the tensor, each dividing that axis. The tensor
of shape ``(n_0, ..., n_{d-1})`` is viewed as ``(n_0/b_0, b_0, ..., n_{d-1}/b_{d-1}, b_{d-1})``;
statistics reduce over the odd (inner) axes, and the quantization parameters have the *grid
shape* ``(n_0/b_0, ..., n_{d-1}/b_{d-1})``, the same rank as the tensor.

=============  ==============================================================
granularity    block extent per axis
=============  ==============================================================
per_tensor     the whole axis everywhere
per_channel    1 on the channel axis (or axes), the whole axis elsewhere
per_token      the whole last axis, 1 on every other axis
per_group      ``group_size`` on ``axis``, 1 on every other axis; with several consecutive
               axes, ``group_size`` consecutive elements of them flattened in order
per_block      ``block_shape`` on the trailing axes, 1 on the leading ones
=============  ==============================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from qjax.numerics.spec import Granularity, QuantSpec


def normalize_axes(axis: int | Sequence[int], ndim: int, arg: str = "axis") -> tuple[int, ...]:
    """Non-negative, sorted, unique axes; a ValueError naming the axis that is out of range."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{arg}={axis!r} is out of range for a tensor of rank {ndim}; "
                f"use an axis in [{-ndim}, {ndim - 1}]"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{arg}={axis!r} names the same axis twice; list each axis once")
    return tuple(sorted(out))


def block_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """The extent of one block along each axis of a tensor of ``shape`` under ``spec``.

    Checks at trace time that the spec fits the shape, with errors that say how to fix it.
    """
    ndim = len(shape)
    g = spec.granularity
    if g == Granularity.PER_TENSOR:
        return tuple(shape)
    if ndim == 0:
        raise ValueError(
            f"granularity={str(g)!r} needs a tensor with at least one axis; got a scalar. "
            "Use granularity='per_tensor'"
        )
    if g == Granularity.PER_TOKEN:
        return (1,) * (ndim - 1) + (shape[-1],)
    if g == Granularity.PER_CHANNEL:
        assert spec.axis is not None  # QuantSpec guarantees it
        channels = normalize_axes(spec.axis, ndim)
        return tuple(1 if a in channels else n for a, n in enumerate(shape))
    if g == Granularity.PER_GROUP:
        assert spec.axis is not None and spec.group_size is not None
        axes = normalize_axes(spec.axis, ndim)
        size = spec.group_size
        if len(axes) > 1:
            return _flattened_group(tuple(shape), axes, size)
        (axis,) = axes
        if shape[axis] % size:
            hint = ""
            if ndim == 4 and axis == 2:
                hint = (
                    f"; for a convolution kernel (H, W, I, O), axis=(0, 1, 2) groups the flattened "
                    f"H*W*I = {shape[0] * shape[1] * shape[2]} reduction elements"
                )
            raise ValueError(
                f"group_size={size} does not divide axis {axis} of size {shape[axis]} "
                f"(tensor shape {tuple(shape)}); use a divisor of {shape[axis]} or pad the tensor{hint}"
            )
        return tuple(size if a == axis else 1 for a in range(ndim))
    assert spec.block_shape is not None
    tile = spec.block_shape
    if len(tile) > ndim:
        raise ValueError(
            f"block_shape={tile} has {len(tile)} axes but the tensor {tuple(shape)} has {ndim}; "
            f"give at most {ndim} extents (they apply to the trailing axes)"
        )
    full = (1,) * (ndim - len(tile)) + tuple(tile)
    for a, (n, b) in enumerate(zip(shape, full, strict=True)):
        if n % b:
            raise ValueError(
                f"block_shape={tile} does not tile the tensor {tuple(shape)}: {b} does not divide "
                f"axis {a} of size {n}; use block extents that divide the axes or pad the tensor"
            )
    return full


def _group_block(shape: tuple[int, ...], axes: tuple[int, ...], size: int) -> tuple[int, ...] | None:
    """The block of ``size`` consecutive elements of the flattened ``axes`` (row-major), or None
    where such groups straddle the axes' rows (they are then not blocks)."""
    block = [1] * len(shape)
    remaining = size
    for a in reversed(axes):
        if remaining == 1:
            break
        n = shape[a]
        if remaining >= n:
            if remaining % n:
                return None
            block[a], remaining = n, remaining // n
        else:
            if n % remaining:
                return None
            block[a], remaining = remaining, 1
    return tuple(block) if remaining == 1 else None


def _flattened_group(shape: tuple[int, ...], axes: tuple[int, ...], size: int) -> tuple[int, ...]:
    """``per_group`` over several consecutive axes: groups of ``size`` consecutive elements of the
    axes flattened in order (a conv kernel's H, W, I), which are blocks of the tensor."""
    block = _group_block(shape, axes, size)
    if block is None:
        total = math.prod(shape[a] for a in axes)
        fits = [d for d in range(1, total + 1) if total % d == 0 and _group_block(shape, axes, d)]
        raise ValueError(
            f"group_size={size} over the flattened axes {axes} (extents "
            f"{tuple(shape[a] for a in axes)}, {total} elements) does not make whole groups that "
            f"stay within the axes' rows; use one of {fits}"
        )
    return block


def grid_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the quantization parameters: one entry per block."""
    return tuple(n // b for n, b in zip(shape, block, strict=True))


def block_size(block: tuple[int, ...]) -> int:
    """Number of elements that share one scale."""
    return math.prod(block)


def tiled_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """``(n_0/b_0, b_0, n_1/b_1, b_1, ...)``."""
    tiled: list[int] = []
    for n, b in zip(shape, block, strict=True):
        tiled += [n // b, b]
    return tuple(tiled)


def tile(x: jax.Array, block: tuple[int, ...]) -> jax.Array:
    """View ``x`` as :func:`tiled_shape`."""
    return x.reshape(tiled_shape(x.shape, block))


def untile(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`tile`."""
    return x.reshape(shape)


def expand(params: jax.Array, block: tuple[int, ...]) -> jax.Array:
    """Reshape grid-shaped parameters to broadcast against a tiled tensor."""
    tiled = []
    for g in params.shape:
        tiled += [g, 1]
    return params.reshape(tiled)


def spanned_axes(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes a block spans whole, when along every other axis it holds one element (per-tensor,
    per-channel and per-token blocks), else ``None``. A reduction over these axes with
    ``keepdims=True`` is then the per-block reduction, grid-shaped, without :func:`tile`'s
    ``2 * ndim``-axis view (which XLA on CPU copies before reducing)."""
    if any(b not in (1, n) for n, b in zip(shape, block, strict=True)):
        return None
    return tuple(i for i, (n, b) in enumerate(zip(shape, block, strict=True)) if b == n and n > 1)


def inner_axes(ndim: int) -> tuple[int, ...]:
    """The axes of a tiled tensor that run inside one block."""
    return tuple(range(1, 2 * ndim, 2))


def blocks_last(x: jax.Array, block: tuple[int, ...]) -> jax.Array:
    """``x`` as ``grid_shape + (block_size,)``: each block's elements along the last axis."""
    ndim = x.ndim
    t = tile(x, block)
    perm = tuple(range(0, 2 * ndim, 2)) + inner_axes(ndim)
    return jnp.transpose(t, perm).reshape((*grid_shape(x.shape, block), block_size(block)))


def unblocks_last(y: jax.Array, shape: tuple[int, ...], block: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`blocks_last`: back to the tensor's own ``shape``."""
    ndim = len(shape)
    grid = grid_shape(shape, block)
    t = y.reshape(grid + tuple(block))
    perm = []
    for a in range(ndim):
        perm += [a, ndim + a]
    return jnp.transpose(t, perm).reshape(shape)


def per_element(params: jax.Array, shape: tuple[int, ...], block: tuple[int, ...]) -> jax.Array:
    """Grid-shaped (or tiled-broadcastable) parameters repeated over their blocks: ``shape``."""
    if params.ndim != 2 * len(shape):
        params = expand(params, block)
    return untile(jnp.broadcast_to(params, tiled_shape(shape, block)), shape)
