"""A resumable position in a shuffled, epoch-based stream of batches.

Epoch :math:`e` visits the examples in the order of a permutation :math:`\\pi_e` drawn from
``numpy.random.default_rng([seed, e])``; batch :math:`i` of the epoch is
:math:`\\pi_e[iB : (i+1)B]` (the incomplete last batch is dropped). The order is a pure function of
``(seed, epoch, index)``, so a :class:`DataPosition` saved in a checkpoint resumes the stream
exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from qjax.numerics.fields import SpecError


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataPosition:
    """Where a training run is: ``step`` optimizer steps done, the next batch is batch ``index``
    of epoch ``epoch``."""

    step: int = 0
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        for name in ("step", "epoch", "index"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 0:
                raise SpecError(f"DataPosition {name}={value!r} must be a non-negative integer", field=name)

    def to_dict(self) -> dict[str, int]:
        return {"step": int(self.step), "epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        return cls(**{k: int(v) for k, v in d.items()})


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """:math:`\\pi_e`: the order of the examples in epoch ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(
    num_examples: int, batch_size: int, *, seed: int, start: DataPosition | None = None
) -> Iterator[tuple[DataPosition, np.ndarray]]:
    """Endless ``(position, indices)`` pairs from ``start``; ``position`` is the position *after*
    the batch (what to save once the step on ``indices`` is done)."""
    if batch_size < 1 or batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} must be in [1, num_examples={num_examples}]")
    pos = start if start is not None else DataPosition()
    per_epoch = num_examples // batch_size
    if pos.index >= per_epoch:
        raise ValueError(f"DataPosition index={pos.index} is past the {per_epoch} batches of an epoch")
    step, epoch, index = pos.step, pos.epoch, pos.index
    while True:
        order = epoch_order(num_examples, seed, epoch)
        while index < per_epoch:
            idx = order[index * batch_size : (index + 1) * batch_size]
            step, index = step + 1, index + 1
            nxt = DataPosition(step=step, epoch=epoch + index // per_epoch, index=index % per_epoch)
            yield nxt, idx
        epoch, index = epoch + 1, 0


__all__ = ["DataPosition", "batch_indices", "epoch_order"]
