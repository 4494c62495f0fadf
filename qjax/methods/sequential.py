"""Block-by-block calibration of a deep model, as GPTQ and AWQ need it.

A model is described to the methods as a sequence of :class:`Block`: a function ``run(h) -> h`` on
the hidden states and the block's linears in :attr:`Block.groups`, in the order their inputs become
final (e.g. for a Llama block: ``(q, k, v)``, ``(o,)``, ``(gate, up)``, ``(down,)``; the linears of
one group read the same input). :func:`capture_inputs` records what a group's linears receive while
a block runs (eagerly: the arrays are kept on the host side of the trace), and :func:`pin_weights`
installs each quantized weight with its fixed grid into a model quantized by
:func:`qjax.nn.quantize_model`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from qjax.nn.model import pin_weight_qparams, quantizable_layers
from qjax.numerics import QParams


@dataclasses.dataclass(frozen=True)
class Block:
    """One block: ``run(h) -> h`` and its linears, as groups of ``(path, nnx.Linear)`` sharing an input."""

    run: Callable[[jax.Array], jax.Array]
    groups: tuple[tuple[tuple[str, nnx.Linear], ...], ...]


class _Recorder:
    """A ``dot_general`` hook that keeps every input it sees (as ``(tokens, K)``) and passes the call on."""

    def __init__(self, inner: Callable[..., Any]):
        self.inner = inner
        self.inputs: list[jax.Array] = []

    def __call__(self, lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> Any:
        self.inputs.append(jnp.asarray(lhs, jnp.float32).reshape(-1, lhs.shape[-1]))
        return self.inner(lhs, rhs, *args, **kwargs)


@contextlib.contextmanager
def capture_inputs(layers: Sequence[nnx.Linear]) -> Iterator[list[list[jax.Array]]]:
    """While active, each call of ``layers[i]`` (eager, not under ``jit``) appends its input,
    reshaped to ``(tokens, in_features)``, to ``captured[i]``; the hooks are restored on exit."""
    saved = [layer.dot_general for layer in layers]
    recorders = [_Recorder(h) for h in saved]
    try:
        for layer, rec in zip(layers, recorders, strict=True):
            layer.dot_general = nnx.static(rec)
        yield [rec.inputs for rec in recorders]
    finally:
        for layer, h in zip(layers, saved, strict=True):
            layer.dot_general = nnx.data(h) if isinstance(h, nnx.Module) else nnx.static(h)


def group_input(block: Block, group: int, h: jax.Array) -> jax.Array:
    """The input ``(tokens, K)`` that the linears of ``block.groups[group]`` receive when the block
    runs on ``h`` (the block's other groups as they are now)."""
    first = block.groups[group][0][1]
    with capture_inputs([first]) as captured:
        block.run(h)
    if not captured[0]:
        raise ValueError(f"{block.groups[group][0][0]!r} was not called when its block ran")
    return jnp.concatenate(captured[0], axis=0)


def pin_weights(model: nnx.Module, pinned: Mapping[str, tuple[jax.Array, QParams]]) -> nnx.Module:
    """Install ``pinned[path] = (w_hat, qparams)`` into the quantized ``model`` (in place): the
    kernel becomes ``w_hat`` and the layer's weight quantizer uses the grid ``qparams``."""
    layers = dict(quantizable_layers(model))
    missing = sorted(set(pinned) - set(layers))
    if missing:
        raise ValueError(f"no quantized layer at {missing}; layers: {sorted(layers)[:8]}...")
    for path, (w_hat, qp) in pinned.items():
        pin_weight_qparams(layers[path], w_hat, qp)
    return model
