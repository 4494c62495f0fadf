"""Which Flax layers qjax quantizes, and the hook of each that it replaces.

``nnx.Linear``, ``nnx.Conv`` and ``nnx.Einsum`` delegate their contraction to an injectable attribute
(``dot_general``, ``conv_general_dilated``, ``einsum_op``); ``nnx.Embed`` has no contraction and is
reached through its ``promote_dtype`` hook. qjax installs its ops (and its recorders, for diagnostics
and AdaRound) there, so the layer objects and their variable paths stay Flax's own.

A layer's path is the attribute names and list indices that lead to it, joined with ``/``
(``"blocks/0/attn/query"``): what :class:`qjax.nn.Rule` paths match.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any, NamedTuple

import flax.nnx as nnx


class OpKind(enum.StrEnum):
    """The operation a quantizable layer's hook performs."""

    DOT_GENERAL = "dot_general"  # nnx.Linear: lax.dot_general(x, kernel, dimension_numbers)
    CONV = "conv"  # nnx.Conv: lax.conv_general_dilated(x, kernel, ...)
    EINSUM = "einsum"  # nnx.Einsum: einsum(equation, x, kernel)
    EMBED = "embed"  # nnx.Embed: a table lookup (weight-only: its input is integer ids)


class LayerHook(NamedTuple):
    """Where qjax enters a layer: the ``hook`` attribute it replaces, the ``kernel`` attribute that
    holds the weight, and the ``kind`` of operation."""

    hook: str
    kernel: str
    kind: OpKind

    @property
    def operand(self) -> int:
        """Position of the layer's input among the hook's arguments (an einsum's equation is first)."""
        return 1 if self.kind == OpKind.EINSUM else 0


HOOKS: dict[type, LayerHook] = {
    nnx.Linear: LayerHook("dot_general", "kernel", OpKind.DOT_GENERAL),
    nnx.Conv: LayerHook("conv_general_dilated", "kernel", OpKind.CONV),
    nnx.Einsum: LayerHook("einsum_op", "kernel", OpKind.EINSUM),
    nnx.Embed: LayerHook("promote_dtype", "embedding", OpKind.EMBED),
}


def join_path(parts: Sequence[Any]) -> str:
    """The ``/``-joined path of a node from the key parts ``nnx.iter_graph`` gives it."""
    return "/".join(str(p) for p in parts)


def layer_hook(layer: nnx.Module) -> LayerHook:
    """The :class:`LayerHook` of a Linear, Conv, Einsum or Embed (or a subclass); ``TypeError`` otherwise."""
    for t, hook in HOOKS.items():
        if isinstance(layer, t):
            return hook
    raise TypeError(f"{type(layer).__name__} is not a quantizable layer")


def quantizable_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, layer)`` for every Linear, Conv, Einsum and Embed in the model, in graph order."""
    out = []
    for parts, node in nnx.iter_graph(model):
        if any(isinstance(node, t) for t in HOOKS):
            out.append((join_path(parts), node))
    return out


Wrap = Callable[[str, Callable[..., Any], int], Callable[..., Any]]


@contextlib.contextmanager
def wrapped_contractions(
    model: nnx.Module, wrap: Wrap, paths: Container[str] | None = None
) -> Iterator[None]:
    """Inside the ``with`` block, the contraction hook of every Linear / Conv / Einsum of ``model``
    (those whose path is in ``paths``, if given) is ``wrap(path, hook, operand)``, with ``hook`` the
    layer's own hook and ``operand`` the position of its input (:attr:`LayerHook.operand`). The
    layers' own hooks are restored on exit; Embed layers are left alone."""
    installed = []
    for path, layer in quantizable_layers(model):
        hook = layer_hook(layer)
        if hook.kind == OpKind.EMBED or (paths is not None and path not in paths):
            continue
        inner = getattr(layer, hook.hook)
        setattr(layer, hook.hook, wrap(path, inner, hook.operand))
        installed.append((layer, hook.hook, inner))
    try:
        yield
    finally:
        for layer, name, inner in reversed(installed):
            setattr(layer, name, nnx.data(inner) if isinstance(inner, nnx.Module) else inner)
