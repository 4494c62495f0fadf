"""Where a cell's arrays live: one device, or the ``data x fsdp`` mesh of its ``mesh:`` section.

On a mesh, the model's kernels (with their quantizer scales) and the optimizer state are split over
``fsdp`` (:func:`qjax.training.shard_model`, :func:`~qjax.training.shard_optimizer`), each batch is
split over ``data`` (a batch that ``data`` does not divide, e.g. the last evaluation batch, is
replicated instead), and every train step keeps that layout. With several processes
(``jax.distributed``) the mesh spans the devices of all of them and each process reads only the
rows of a batch that its devices hold. XLA then runs the same program over
the mesh: results agree with one device up to float rounding (sums split over devices add in
another order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.nnx as nnx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.tasks.base import Split
from qjax import training


def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` with a -1 resolved to the devices the other axis leaves; raises a
    ``ValueError`` naming the fix when the mesh does not fit ``n_devices``."""
    for name, size in (("data", data), ("fsdp", fsdp)):
        if size < 1 and size != -1:
            raise ValueError(f"mesh.{name}={size}: must be >= 1, or -1 for the remaining devices")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp are both -1: give one of them a size")
    other = fsdp if data == -1 else data
    if -1 in (data, fsdp):
        if n_devices % other:
            raise ValueError(
                f"mesh: {n_devices} devices cannot be split evenly by {other}; "
                f"give both sizes (their product at most {n_devices})"
            )
        data, fsdp = (n_devices // other, fsdp) if data == -1 else (data, n_devices // other)
    if data * fsdp > n_devices:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices; {n_devices} available "
            "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)"
        )
    return data, fsdp


@dataclasses.dataclass(frozen=True)
class Placement:
    """The mesh of a cell (``None``: jax's default device), and how its model, optimizer and batches
    are put on it."""

    mesh: Mesh | None = None

    @classmethod
    def of(cls, data: int, fsdp: int) -> Placement:
        """The placement of a ``mesh:`` section. With several processes the mesh must hold every
        device of every process (each process runs the same program on its part of the mesh)."""
        data, fsdp = mesh_shape(data, fsdp, jax.device_count())
        if jax.process_count() > 1 and data * fsdp != jax.device_count():
            raise ValueError(
                f"mesh data={data} x fsdp={fsdp} uses {data * fsdp} of the {jax.device_count()} devices "
                f"of {jax.process_count()} processes; with several processes the mesh must use all of "
                "them: set mesh.data=-1 (or sizes whose product is the device count)"
            )
        if data * fsdp == 1 and jax.process_count() == 1:
            return cls(None)
        return cls(training.make_mesh(data, fsdp))

    @property
    def data_size(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["data"])

    def model(self, model: nnx.Module) -> nnx.Module:
        """``model`` with its variables placed on the mesh (in place)."""
        return model if self.mesh is None else training.shard_model(model, self.mesh)

    def optimizer(self, optimizer: nnx.Optimizer, model: nnx.Module) -> nnx.Optimizer:
        return optimizer if self.mesh is None else training.shard_optimizer(optimizer, model, self.mesh)

    def take(self, split: Split, idx: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """The examples ``idx`` of ``split`` split over ``data`` (replicated if ``data`` does not
        divide their number); each process reads only the rows its devices hold
        (:func:`qjax.training.make_global_batch`)."""
        if self.mesh is None:
            return split.take(idx)
        spec = PartitionSpec("data") if len(idx) % self.data_size == 0 else PartitionSpec()
        return training.make_global_batch(split.rows, idx, NamedSharding(self.mesh, spec))

    def replicate_across_processes(self, model: nnx.Module) -> nnx.Module:
        """With several processes, ``model`` whole on every device (in place), so that every
        process can read its values (diagnostics, storage, conversion); as it is otherwise."""
        if self.mesh is None or jax.process_count() == 1:
            return model
        return training.replicate(model, self.mesh)

    def describe(self) -> dict[str, Any] | None:
        """What the record states: the mesh axes, its devices and the processes that drove them
        (``None`` on one device)."""
        if self.mesh is None:
            return None
        return {
            "data": self.data_size,
            "fsdp": int(self.mesh.shape["fsdp"]),
            "devices": [str(d) for d in self.mesh.devices.flat],
            "processes": jax.process_count(),
        }


def devices_of(tree: Any) -> str:
    """The devices that hold the arrays of ``tree``, e.g. ``"cpu: cpu x4"`` (what the record's
    ``device`` states: the devices that held the model, not all the host has)."""
    devices: set[jax.Device] = set()
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            devices |= set(x.sharding.device_set)
    if not devices:
        devices = {jax.devices()[0]}
    d = min(devices, key=lambda d: d.id)
    return f"{d.platform}: {d.device_kind} x{len(devices)}"
