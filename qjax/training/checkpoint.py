"""Checkpoints of training runs and converted models, through ``orbax.checkpoint.CheckpointManager``.

A checkpoint of step :math:`t` holds up to four items:

* ``model``: every variable of ``nnx.state(model)``: parameters, learned quantizer parameters
  (LSQ scales, PACT clips), calibration statistics (``QuantStats``), static activation parameters
  (``StaticQParams``), RNG keys and counters, and the packed ``QArray`` kernels of a converted model
  (their integer data, scales and zero points; the static ``QuantSpec`` and logical length come from
  the model restored into, so a converted model restores into ``convert(quantize_model(...))`` of a
  fresh float model, abstract or concrete);
* ``optimizer``: the optimizer state and step count;
* ``rngs``: an ``nnx.Rngs`` of the training loop kept outside the model;
* ``data``: the data position (a JSON mapping, e.g. :class:`~qjax.training.DataPosition`).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest: results are never half-written. Saves happen
when :math:`t \\bmod N = 0` (``save_every``); the latest ``keep`` steps are kept.

Arrays restore with the shardings of the model and optimizer restored into, so a checkpoint saved on
one mesh restores on another (or on one device): build the target, place it
(:func:`~qjax.training.shard_model`), then :meth:`TrainingCheckpointer.restore`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from qjax.training.data import DataPosition


class RestoredCheckpoint(NamedTuple):
    """The step restored and the data position saved with it (``None`` if none was)."""

    step: int
    data: dict[str, Any] | None


def default_sharding() -> jax.sharding.Sharding:
    """Where a leaf without a sharding (of an abstract target) restores: device 0 with one process;
    with several, whole on every device of every process (each process can read it)."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices(), dtype=object), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _as_target(x: Any, default: jax.sharding.Sharding) -> Any:
    """Abstract leaf with the sharding to restore onto (a concrete leaf's own, else ``default``)."""
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default if sharding is None else sharding)


def _agreed_step(step: int | None) -> int | None:
    """``step`` as process 0 sees it, on every process (they restore the same checkpoint even if
    one of them listed the directory while another was still finishing a save)."""
    if jax.process_count() == 1:
        return step
    agreed = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
    return None if agreed < 0 else agreed


def _pure(node: Any) -> Any:
    return nnx.to_pure_dict(nnx.state(node))


def _restore_into(node: Any, restored: Any) -> None:
    """Set every variable of ``node`` to its restored value (a variable's value may itself be a
    dict, e.g. ``QuantStats``, or a ``QArray``, so the lookup stops at the variable's path)."""
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(node)):
        value = restored
        for key in path:
            value = value[key]
        flat.append((path, var.replace(value)))
    nnx.update(node, nnx.from_flat_state(flat))


class TrainingCheckpointer:
    """Save every ``save_every`` steps, keep the last ``keep``, restore the latest.

    .. code-block:: python

        ckpt = TrainingCheckpointer(directory, save_every=100, keep=3)
        restored = ckpt.restore(model, optimizer)            # None on a fresh start
        position = DataPosition() if restored is None else DataPosition.from_dict(restored.data)
        for position, idx in batch_indices(n, batch_size, seed=seed, start=position):
            train_step(model, optimizer, batch(idx))
            ckpt.save(position.step, model, optimizer, data=position.to_dict())
        ckpt.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int = 1,
        keep: int | None = 3,
        async_save: bool = False,
    ):
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1 (steps between checkpoints)")
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep} must be >= 1, or None to keep every checkpoint")
        self.directory = pathlib.Path(directory).resolve()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the step % save_every test is ours (orbax also saves a first step)
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(
        self,
        step: int,
        model: Any,
        optimizer: Any = None,
        *,
        rngs: nnx.Rngs | None = None,
        data: DataPosition | Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save if ``step`` is a multiple of ``save_every`` (or ``force``); returns whether it did."""
        if not force and step % self.save_every:
            return False
        items: dict[str, Any] = {"model": ocp.args.StandardSave(_pure(model))}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardSave(_pure(optimizer))
        if rngs is not None:
            items["rngs"] = ocp.args.StandardSave(_pure(rngs))
        if data is not None:
            payload = data.to_dict() if isinstance(data, DataPosition) else dict(data)
            items["data"] = ocp.args.JsonSave(payload)
        return bool(self.manager.save(step, args=ocp.args.Composite(**items), force=True))

    def restore(
        self,
        model: Any,
        optimizer: Any = None,
        *,
        rngs: nnx.Rngs | None = None,
        step: int | None = None,
    ) -> RestoredCheckpoint | None:
        """Restore ``step`` (default: the latest) into ``model`` (and ``optimizer``, ``rngs``) in place.

        The objects restored into give the structure, static metadata and shardings; an abstract
        model (``nnx.eval_shape``) restores onto :func:`default_sharding` (device 0 with one
        process, every device with several). With several processes, every one restores the
        step process 0 chose. Returns ``None`` if there is no checkpoint yet.
        """
        step = _agreed_step(self.manager.latest_step() if step is None else step)
        if step is None:
            return None
        if step not in self.manager.all_steps():
            raise ValueError(f"no checkpoint for step={step} in {self.directory}; have {self.all_steps()}")
        present = {p.name for p in (self.directory / str(step)).iterdir()}
        nodes = {"model": model, "optimizer": optimizer, "rngs": rngs}
        default = default_sharding()
        args: dict[str, Any] = {}
        for name, node in nodes.items():
            if node is None:
                continue
            if name not in present:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} has no {name!r} item to restore"
                )
            target = jax.tree.map(lambda x: _as_target(x, default), _pure(node))
            args[name] = ocp.args.StandardRestore(target)
        if "data" in present:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        for name, node in nodes.items():
            if node is not None:
                _restore_into(node, restored[name])
        return RestoredCheckpoint(step, restored["data"] if "data" in args else None)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_bytes(self, step: int) -> int:
        """Bytes on disk of checkpoint ``step`` (all items and orbax metadata)."""
        root = self.directory / str(step)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> TrainingCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["RestoredCheckpoint", "TrainingCheckpointer", "default_sharding"]
