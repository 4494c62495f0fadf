"""Which Flax layers qjax quantizes, and the hook of each that it replaces.

``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and ``nnx.Einsum`` delegate their contraction to
an injectable attribute (``dot_general``, ``conv_general_dilated``, ``einsum_op``); ``nnx.Embed`` has
no contraction and ``nnx.ConvTranspose`` calls ``lax.conv_transpose`` itself: both are reached
through their ``promote_dtype`` hook, which receives the layer's operands. The attention
contractions (:math:`QK^T` and :math:`PV`) of ``nnx.MultiHeadAttention``, and of any module that
declares an ``attention_fn`` with the signature of ``flax.nnx.dot_product_attention`` (the
attention protocol, :mod:`qjax.nn.attention`), are reached through that ``attention_fn``
(:func:`attention_layers`); the projections are ordinary Linear / LinearGeneral layers.
qjax installs its ops (and its recorders, for diagnostics and AdaRound) there, so the layer objects
and their variable paths stay Flax's own.

A layer's path is the attribute names and list indices that lead to it, joined with ``/``
(``"blocks/0/attn/query"``): what :class:`qjax.nn.Rule` paths match.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp


class OpKind(enum.StrEnum):
    """The operation a quantizable layer's hook performs."""

    DOT_GENERAL = "dot_general"  # nnx.Linear, nnx.LinearGeneral: lax.dot_general(x, kernel, dn)
    CONV = "conv"  # nnx.Conv: lax.conv_general_dilated(x, kernel, ...)
    EINSUM = "einsum"  # nnx.Einsum: einsum(equation, x, kernel)
    EMBED = "embed"  # nnx.Embed: a table lookup (weight-only: its input is integer ids)
    CONV_TRANSPOSE = "conv_transpose"  # nnx.ConvTranspose: promote_dtype((x, kernel, bias)), then lax
    ATTENTION = "attention"  # an attention layer's attention_fn(q, k, v, ...): QK^T and PV


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
    nnx.LinearGeneral: LayerHook("dot_general", "kernel", OpKind.DOT_GENERAL),
    nnx.ConvTranspose: LayerHook("promote_dtype", "kernel", OpKind.CONV_TRANSPOSE),
    nnx.Conv: LayerHook("conv_general_dilated", "kernel", OpKind.CONV),
    nnx.Einsum: LayerHook("einsum_op", "kernel", OpKind.EINSUM),
    nnx.Embed: LayerHook("promote_dtype", "embedding", OpKind.EMBED),
}


def join_path(parts: Sequence[Any]) -> str:
    """The ``/``-joined path of a node from the key parts ``nnx.iter_graph`` gives it."""
    return "/".join(str(p) for p in parts)


def layer_hook(layer: nnx.Module) -> LayerHook:
    """The :class:`LayerHook` of a Linear, LinearGeneral, Conv, ConvTranspose, Einsum or Embed (or a
    subclass); ``TypeError`` otherwise."""
    for t, hook in HOOKS.items():
        if isinstance(layer, t):
            return hook
    raise TypeError(f"{type(layer).__name__} is not a quantizable layer")


def quantizable_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, layer)`` for every Linear, LinearGeneral, Conv, ConvTranspose, Einsum and Embed in
    the model, in graph order."""
    out = []
    for parts, node in nnx.iter_graph(model):
        if any(isinstance(node, t) for t in HOOKS):
            out.append((join_path(parts), node))
    return out


ATTENTION_HOOK = LayerHook("attention_fn", "", OpKind.ATTENTION)


def is_attention_layer(node: object) -> bool:
    """Whether ``node`` is an attention layer: an NNX module with an ``attention_fn`` attribute
    (the attention protocol of :mod:`qjax.nn.attention`; ``nnx.MultiHeadAttention`` has one)."""
    return isinstance(node, nnx.Module) and ATTENTION_HOOK.hook in vars(node)


def attention_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, layer)`` for every attention layer of the model (:func:`is_attention_layer`), in
    graph order: the layers whose attention contractions a rule of ``kind='attention'`` quantizes."""
    return [(join_path(parts), node) for parts, node in nnx.iter_graph(model) if is_attention_layer(node)]


Wrap = Callable[[str, Callable[..., Any], int], Callable[..., Any]]


@contextlib.contextmanager
def wrapped_contractions(
    model: nnx.Module, wrap: Wrap, paths: Container[str] | None = None
) -> Iterator[None]:
    """Inside the ``with`` block, the contraction hook of every Linear / LinearGeneral / Conv /
    Einsum of ``model`` (those whose path is in ``paths``, if given) is ``wrap(path, hook,
    operand)``, with ``hook`` the layer's own hook and ``operand`` the position of its input
    (:attr:`LayerHook.operand`). The layers' own hooks are restored on exit; Embed and ConvTranspose
    layers (reached through ``promote_dtype``, not a contraction) are left alone."""
    installed = []
    for path, layer in quantizable_layers(model):
        hook = layer_hook(layer)
        if hook.hook == "promote_dtype" or (paths is not None and path not in paths):
            continue
        own = getattr(layer, hook.hook)
        setattr(layer, hook.hook, wrap(path, own or default_contraction(hook.kind), hook.operand))
        installed.append((layer, hook.hook, own))
    try:
        yield
    finally:
        for layer, name, own in reversed(installed):
            setattr(layer, name, nnx.data(own) if isinstance(own, nnx.Module) else nnx.static(own))


def default_contraction(kind: OpKind) -> Callable[..., Any]:
    """The function a layer of ``kind`` calls when its hook is unset (``LinearGeneral.dot_general``
    defaults to ``None``, meaning ``lax.dot_general``)."""
    functions: dict[OpKind, Callable[..., Any]] = {
        OpKind.DOT_GENERAL: jax.lax.dot_general,
        OpKind.CONV: jax.lax.conv_general_dilated,
    }
    return functions.get(kind, jnp.einsum)
