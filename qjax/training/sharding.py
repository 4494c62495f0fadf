"""Data-parallel and FSDP sharding of NNX models, their quantizer state and their optimizers.

The mesh has a ``data`` axis (the batch is split over it) and optionally an ``fsdp`` axis
(parameters are split over it). A kernel of shape :math:`(d_0, \\dots, d_{r-1})` on an ``fsdp`` axis
of size :math:`n` is split along

.. math::  a^* = \\operatorname{argmax}_{a:\\; n \\mid d_a} d_a \\quad (\\text{ties: the later axis}),

and replicated when no axis divides. Everything tied to a kernel follows it: a quantizer scale (LSQ
``weight_scale``, a ``QArray``'s scale, zero point or codebook) is grid-shaped, one entry per block,
and is split along :math:`a^*` when its extent there is divisible by :math:`n` (every shard then
holds whole blocks: a per-channel scale of a kernel split on its output axis is split the same way),
else replicated. A converted kernel (``QArray``) is split along an axis where its stored (packed)
data divides too. Variables annotated by the user (``nnx.with_partitioning``, ``out_sharding``
metadata) keep their annotation; biases, statistics and RNG state are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.nnx as nnx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qjax.nn import quantized_ops
from qjax.numerics import QArray

Path = tuple[Any, ...]


def make_mesh(data: int, fsdp: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh with automatic (GSPMD) axes over the first ``data * fsdp`` devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or fsdp < 1 or data * fsdp > len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices; {len(devices)} available "
            "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)"
        )
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def largest_divisible_axis(shapes: Sequence[Sequence[int]], size: int) -> int | None:
    """The axis of ``shapes[0]`` with the largest extent that ``size`` divides in every shape
    (ties: the later axis), or ``None`` if there is none or ``size == 1``."""
    if size <= 1:
        return None
    best: int | None = None
    for a, extent in enumerate(shapes[0]):
        divides = all(a < len(s) and s[a] % size == 0 for s in shapes)
        if divides and (best is None or extent >= shapes[0][best]):
            best = a
    return best


def fsdp_spec(shape: Sequence[int], size: int, axis_name: str = "fsdp") -> PartitionSpec:
    """``PartitionSpec`` splitting the largest axis of ``shape`` divisible by ``size``."""
    a = largest_divisible_axis([shape], size)
    return PartitionSpec() if a is None else _on_axis(len(shape), a, axis_name)


def _on_axis(ndim: int, axis: int, name: str) -> PartitionSpec:
    return PartitionSpec(*(name if i == axis else None for i in range(ndim)))


def follow_spec(kernel_spec: PartitionSpec, leaf_shape: Sequence[int], size: int) -> PartitionSpec:
    """The spec of a grid-shaped companion of a kernel (scale, zero point): the kernel's split axes
    where the companion's extent is divisible by ``size``, else replicated."""
    if len(kernel_spec) > len(leaf_shape):
        return PartitionSpec()
    names = [n if n is not None and leaf_shape[i] % size == 0 else None for i, n in enumerate(kernel_spec)]
    return PartitionSpec(*names) if any(n is not None for n in names) else PartitionSpec()


def _qarray_specs(q: QArray, size: int, axis_name: str) -> tuple[PartitionSpec, Any]:
    """The logical kernel's spec, and a ``QArray`` of specs whose stored leaves (data, scale, zero
    point, ...) follow it."""
    a = largest_divisible_axis([q.shape, q.data.shape], size)
    kspec = PartitionSpec() if a is None else _on_axis(len(q.shape), a, axis_name)
    return kspec, jax.tree.map(lambda x: follow_spec(kspec, x.shape, size), q)


def _kernel_var(layer: nnx.Module) -> nnx.Variable:
    return layer.embedding if isinstance(layer, nnx.Embed) else layer.kernel  # type: ignore[attr-defined]


def _kernel_specs(model: nnx.Module, paths: dict[int, Path], size: int, axis_name: str) -> dict[Path, Any]:
    """Specs of the quantized layers' kernels and of the quantizer scales that follow them (a
    user-annotated kernel keeps its annotation and its scale is replicated)."""
    specs: dict[Path, Any] = {}
    for _, layer, op in quantized_ops(model):
        kvar = _kernel_var(layer)
        if kvar.get_metadata().get("out_sharding"):
            continue
        kernel = kvar.get_value()
        if isinstance(kernel, QArray):
            kspec, specs[paths[id(kvar)]] = _qarray_specs(kernel, size, axis_name)
        else:
            kspec = specs[paths[id(kvar)]] = fsdp_spec(kernel.shape, size, axis_name)
        scale = getattr(op, "weight_scale", None)
        if scale is not None:
            specs[paths[id(scale)]] = follow_spec(kspec, scale.get_value().shape, size)
    return specs


def partition_specs(model: nnx.Module, *, fsdp_size: int = 1, fsdp_axis: str = "fsdp") -> Any:
    """A tree like ``nnx.state(model)`` holding each variable's ``PartitionSpec`` (see module doc).

    Annotated variables (``out_sharding`` metadata) keep their annotation; other ``nnx.Param`` of
    rank >= 2 are kernels (FSDP split); everything else is replicated (``PartitionSpec()``).
    """
    paths = {id(v): p for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    tied = _kernel_specs(model, paths, fsdp_size, fsdp_axis)

    def spec(keypath: Any, var: Any) -> Any:
        if not isinstance(var, nnx.Variable):
            return None
        value = var.get_value()
        path = _keys(keypath)
        annotated = var.get_metadata().get("out_sharding")
        if annotated and not isinstance(value, QArray):
            s: Any = jax.tree.map(lambda _: PartitionSpec(*annotated), value)
        elif path in tied:
            s = tied[path]
        elif isinstance(var, nnx.Param) and getattr(value, "ndim", 0) >= 2:
            s = fsdp_spec(value.shape, fsdp_size, fsdp_axis)
        else:
            s = jax.tree.map(lambda _: PartitionSpec(), value)
        return var.replace(s)

    return jax.tree_util.tree_map_with_path(
        spec, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def _keys(keypath: Any) -> Path:
    """A jax key path (DictKey, SequenceKey, GetAttrKey) as the plain keys of an NNX path."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)


def _named(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def shard_model(model: nnx.Module, mesh: Mesh, *, fsdp_axis: str | None = "fsdp") -> nnx.Module:
    """Place every variable of ``model`` on ``mesh`` (in place): kernels and their quantizer scales
    split over ``fsdp_axis`` (``None``: all replicated, pure data parallelism)."""
    size = 1 if fsdp_axis is None else mesh.shape[fsdp_axis]
    specs = partition_specs(model, fsdp_size=size, fsdp_axis=fsdp_axis or "fsdp")
    nnx.update(model, jax.device_put(nnx.state(model), _named(specs, mesh)))
    return model


def shard_optimizer(optimizer: nnx.Optimizer, model: nnx.Module, mesh: Mesh) -> nnx.Optimizer:
    """Place the optimizer state on ``mesh`` (in place): a leaf whose path ends with a parameter's
    path and has its shape (Adam's ``mu``, ``nu``; momentum) gets that parameter's sharding; the
    rest (step counts, scalars) is replicated."""
    by_path: dict[tuple[Any, ...], Any] = {}
    for keypath, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, optimizer.wrt)):
        by_path[_keys(keypath)] = x
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(keypath: Any, x: Any) -> Any:
        keys = _keys(keypath)
        for start in range(len(keys)):
            p = by_path.get(keys[start:])
            if p is not None and p.shape == x.shape and isinstance(p.sharding, NamedSharding):
                return jax.device_put(x, NamedSharding(mesh, p.sharding.spec))
        return jax.device_put(x, replicated)

    nnx.update(optimizer, jax.tree_util.tree_map_with_path(place, nnx.state(optimizer)))
    return optimizer


def replicate(node: Any, mesh: Mesh) -> Any:
    """Place every variable of ``node`` whole on every device of ``mesh`` (in place): after
    training, what reads values on the host (diagnostics, storage accounting, conversion) can, on
    every process."""
    nnx.update(node, jax.device_put(nnx.state(node), NamedSharding(mesh, PartitionSpec())))
    return node


def state_shardings(*nodes: Any) -> tuple[Any, ...]:
    """The current sharding of every array in ``nnx.state(node)``, one tree per node (what
    :func:`~qjax.training.make_train_step` pins its outputs to)."""
    return tuple(jax.tree.map(lambda x: x.sharding, nnx.state(n)) for n in nodes)


def shard_batch(batch: Any, mesh: Mesh, *, data_axis: str | Sequence[str] = "data") -> Any:
    """Split the leading (batch) axis of every array in ``batch`` over ``data_axis``."""
    axes = data_axis if isinstance(data_axis, str) else tuple(data_axis)
    n = mesh.shape[axes] if isinstance(axes, str) else int(np.prod([mesh.shape[a] for a in axes]))

    def put(x: Any) -> jax.Array:
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by the {n} devices of {axes!r}")
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axes)))

    return jax.tree.map(put, batch)


def process_rows(sharding: jax.sharding.Sharding, n: int) -> slice:
    """The rows ``[start, stop)`` of an ``n``-row batch that the devices of this process hold under
    ``sharding`` (a sharding of the leading axis: split or replicated): all of them with one
    process; with several, one block (:func:`make_mesh` puts each process's devices next to each
    other; a layout where a process holds rows apart raises a ``ValueError``)."""
    rows = [index[0] for index in sharding.addressable_devices_indices_map((n,)).values() if index]
    spans = sorted({(r.start or 0, n if r.stop is None else r.stop) for r in rows})
    reach = spans[0][0]
    for start, stop in spans:
        if start > reach:
            raise ValueError(
                f"process {jax.process_index()} holds rows {spans} of the batch, not one block: lay "
                "the mesh out so that each process's devices are consecutive along the data axis"
            )
        reach = max(reach, stop)
    return slice(spans[0][0], reach)


def make_global_batch(load: Any, indices: np.ndarray, sharding: jax.sharding.Sharding) -> Any:
    """The batch of examples ``indices`` as global arrays laid out by ``sharding``, each process
    loading only its own rows: ``load(indices[rows])`` (a tree of numpy arrays, leading axis the
    batch) with ``rows`` from :func:`process_rows`, assembled by
    ``jax.make_array_from_process_local_data``. With one process it loads the whole batch."""
    n = len(indices)
    local = load(indices[process_rows(sharding, n)])

    def assemble(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (n, *x.shape[1:]))

    return jax.tree.map(assemble, local)


__all__ = [
    "follow_spec",
    "fsdp_spec",
    "largest_divisible_axis",
    "make_global_batch",
    "make_mesh",
    "partition_specs",
    "process_rows",
    "replicate",
    "shard_batch",
    "shard_model",
    "shard_optimizer",
    "state_shardings",
]
