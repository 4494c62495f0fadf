"""Checkpoints of training runs and converted models, through ``orbax.checkpoint.CheckpointManager``.

A checkpoint of step :math:`t` holds up to four items:

* ``model``: every variable of ``nnx.state(model)``: parameters, learned quantizer parameters
  (LSQ scales, PACT clips), calibration statistics (``QuantStats``) and static activation
  parameters (``StaticQParams``) of the layers whose rules keep them, RNG keys and counters, and
  the packed ``QArray`` kernels of a converted model
  (their integer data, scales and zero points; the static ``QuantSpec`` and logical length come from
  the model restored into, so a converted model restores into ``convert(quantize_model(...))`` of a
  fresh float model, abstract or concrete);
* ``optimizer``: the optimizer state and step count;
* ``rngs``: an ``nnx.Rngs`` of the training loop kept outside the model;
* ``data``: the data position (a JSON mapping, e.g. :class:`~qjax.training.DataPosition`).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest: results are never half-written. Each saved
step is then sealed with the checksums of its files (:mod:`qjax.training.integrity`); a restore
verifies them, reads the step and checks its values finite, and falls back to the latest retained
step that passes (logging what was wrong with the later ones), or raises
:class:`CheckpointDamaged` naming the directory when none does. Saves happen
when :math:`t \\bmod N = 0` (``save_every``); the latest ``keep`` steps are kept.

Arrays restore with the shardings of the model and optimizer restored into, so a checkpoint saved on
one mesh restores on another (or on one device): build the target, place it
(:func:`~qjax.training.shard_model`), then :meth:`TrainingCheckpointer.restore`.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from qjax.training import integrity
from qjax.training.data import DataPosition

logger = logging.getLogger("qjax.training")


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


def _agreed(value: int) -> int:
    """``value`` as process 0 has it, on every process (they restore the same checkpoint even if
    one of them listed the directory while another was still finishing a save)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _agreed_steps(steps: list[int]) -> list[int]:
    """Process 0's list of steps, on every process."""
    n = _agreed(len(steps))
    return [_agreed(steps[i] if i < len(steps) else -1) for i in range(n)]


class CheckpointDamaged(ValueError):
    """No checkpoint of a directory verifies, reads and holds finite values."""


def _non_finite(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` that hold NaN or Inf."""
    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.isfinite(x).all()):
            bad.append(jax.tree_util.keystr(path))
    return bad


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
        self.async_save = async_save
        self._unsealed: list[int] = []
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
        saved = bool(self.manager.save(step, args=ocp.args.Composite(**items), force=True))
        if saved:
            self._unsealed.append(step)
            if not self.async_save:
                self._seal()
        return saved

    def _seal(self) -> None:
        """Wait for the saves in flight, then write the checksums of each (process 0)."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                step_dir = self.directory / str(step)
                if step_dir.is_dir():  # not already dropped by ``keep``
                    integrity.seal(step_dir)
        self._unsealed.clear()

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
        if step is not None and step not in self.manager.all_steps():
            raise ValueError(f"no checkpoint for step={step} in {self.directory}; have {self.all_steps()}")
        steps = _agreed_steps([step] if step is not None else sorted(self.manager.all_steps(), reverse=True))
        nodes = {"model": model, "optimizer": optimizer, "rngs": rngs}
        problems: list[str] = []
        for candidate in steps:
            problem, restored = self._restore_step(candidate, nodes)
            if problem is not None:
                logger.warning("checkpoint step %d in %s is damaged: %s", candidate, self.directory, problem)
                problems.append(f"step {candidate}: {problem}")
                continue
            if problems:
                self._set_aside([s for s in steps if s > candidate])
                logger.warning(
                    "restored step %d of %s instead; the damaged later steps are kept in %s",
                    candidate,
                    self.directory,
                    self.damaged_directory,
                )
            for name, node in nodes.items():
                if node is not None:
                    _restore_into(node, restored[name])
            return RestoredCheckpoint(candidate, restored.get("data"))
        if not problems:
            return None
        raise CheckpointDamaged(
            f"no checkpoint in {self.directory} can be restored ({'; '.join(problems)}); delete "
            f"{self.directory} to run this from scratch, or put back a copy of it"
        )

    @property
    def damaged_directory(self) -> pathlib.Path:
        """Where damaged steps are moved when an earlier one is restored (beside the directory, so
        that the run can save those step numbers again)."""
        return self.directory.with_name(self.directory.name + ".damaged")

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for step in steps:
                target = self.damaged_directory / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.directory / str(step), target)
        _agreed(0)  # the others wait for the move
        self.manager.reload()

    def _restore_step(self, step: int, nodes: Mapping[str, Any]) -> tuple[str | None, Any]:
        """``(None, restored items)``, or ``(what is wrong, None)`` when step ``step`` does not
        verify, cannot be read, or holds non-finite values (every process gets process 0's verdict
        on the files)."""
        step_dir = self.directory / str(step)
        problem = integrity.verify(step_dir) if jax.process_index() == 0 else None
        if problem == integrity.UNSEALED:
            logger.warning("checkpoint step %d in %s %s: restored unverified", step, self.directory, problem)
            problem = None
        if _agreed(0 if problem is None else 1):
            return problem or "its files do not verify (see process 0's log)", None
        present = {p.name for p in step_dir.iterdir()}
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
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax's errors for unreadable files are of many types
            return f"orbax cannot read it ({type(e).__name__}: {str(e)[:300]})", None
        bad = [f"{name}/{path}" for name in nodes if name in args for path in _non_finite(restored[name])]
        if bad:
            return f"non-finite values in {', '.join(bad[:3])}" + (" and more" if len(bad) > 3 else ""), None
        return None, {name: restored[name] for name in args}

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_bytes(self, step: int) -> int:
        """Bytes on disk of checkpoint ``step`` (all items and orbax metadata)."""
        root = self.directory / str(step)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    def wait_until_finished(self) -> None:
        self._seal()

    def close(self) -> None:
        self._seal()
        self.manager.close()

    def __enter__(self) -> TrainingCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CheckpointDamaged", "RestoredCheckpoint", "TrainingCheckpointer", "default_sharding"]
