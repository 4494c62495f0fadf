"""The benchmark's device data: random weight copies (enough to exceed the L2 cache) and
activations, made once per shape and freed after it.

Random data from raw bits and uniforms (cheap to compile, unlike randint and normal): int8 codes
uniform on [-128, 127], int4 codes on [-8, 7], floats uniform on [-1, 1) (times 2 for fp8), scales
uniform on [0.5, 1.5) times a magnitude that keeps outputs finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from experiments.kernels.bench.rows import GROUP_SIZE, kernel_module

L2_BYTES = 50 * 10**6
COPY_TARGET_BYTES = 4 * L2_BYTES
MAX_PROGRAM_WEIGHT_BYTES = 4 * 2**30
MAX_COPIES = 32


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
        w = kernel_module("experimental.hopper").prepare_weight(w) if family.endswith("hopper") else w.T
        return w, _scales(ks, (1, n), 1e-3 if base == "int8" else 1e-2)
    # w4: symmetric int4 codes with f32 group scales, packed under jit (pack_w4 checks the code range
    # only on concrete arrays, which would copy the codes to the host); w4-hopper: that, prepared
    q, scales = _values(kv, (k, n), "int4"), _scales(ks, (-(-k // GROUP_SIZE), n), 1e-2)
    packed = kernel_module("w4a16").pack_w4(q, scales, None, group_size=GROUP_SIZE)
    return kernel_module("experimental.hopper_w4").prepare_w4(packed) if family == "w4-hopper" else packed


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
