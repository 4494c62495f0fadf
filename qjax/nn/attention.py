"""Attention contractions :math:`QK^T` and :math:`PV`: the attention protocol, the float
grouped-query attention and :class:`QuantizedAttention`.

**The attention protocol.** qjax reaches the attention contractions of a module through its
``attention_fn`` attribute (:func:`qjax.nn.attention_layers`): every NNX module that has one is an
attention layer, ``nnx.MultiHeadAttention`` and :class:`qjax.models.llama.Attention` among them.
The module calls it with the signature of ``flax.nnx.dot_product_attention``,
``attention_fn(query, key, value, bias=None, mask=None, ..., is_causal=False)``, on queries
``(B..., T, H, D)`` and keys / values ``(B..., S, H_kv, D)`` with :math:`H_{kv}` dividing
:math:`H` (grouped-query attention: query head :math:`h` reads key/value head
:math:`\\lfloor h / G \\rfloor`, :math:`G = H / H_{kv}`), after any position encoding of ``q`` and
``k`` and any cache simulation of ``k`` and ``v``. A rule of ``kind='attention'`` replaces the
function by a :class:`QuantizedAttention` when it is one whose float math that op reproduces:
``flax.nnx.dot_product_attention`` or :func:`grouped_query_attention`
(:data:`REPLACEABLE_ATTENTION`); any other function is refused (:func:`check_attention_layer`).

**The math.** With :math:`q` ``(B, T, H, D)`` and :math:`k`, :math:`v` ``(B, S, H_kv, D)``:

.. math::

    L_{bhts} = \\frac{1}{\\sqrt D} \\sum_d \\hat q_{bthd} \\hat k_{bs\\lfloor h/G \\rfloor d}, \\qquad
    P = \\operatorname{softmax}_s(L + \\text{bias}, \\text{mask}), \\qquad
    O_{bthd} = \\sum_s \\hat P_{bhts} \\hat v_{bs\\lfloor h/G \\rfloor d}.

The key / value heads are never repeated: the query heads are grouped as ``(B, H_kv, G, T, D)``
and both contractions batch over ``(B, H_kv)``. Logits and softmax are float32; masking, bias,
``is_causal`` and dropout follow Flax's ``dot_product_attention_weights`` (a masked logit is the
float32 minimum, so a fully masked row gives uniform weights, never NaN).

In :class:`QuantizedAttention` every operand is quantized with the rule's ``activations`` spec,
dynamically (each call's range), with one scale per tensor (``per_tensor``: over the whole
``(B, T, H, D)`` query tensor, the whole ``(B, S, H_kv, D)`` key and value tensors, all of
:math:`P`) or per row of the contraction (``per_token``): one per ``(b, t, h)`` for :math:`q`,
``(b, s, h_kv)`` for :math:`k`, ``(b, h, t)`` for :math:`P` and ``(b, h_kv, d)`` for :math:`v`
(a scale must be constant along the contracted axis for the integer contraction to factor it out,
so :math:`v`'s "tokens" are its channels). Grouping changes no scale: a key / value head repeated
over its :math:`G` query heads would have the same range. In ``qat`` the operands are
fake-quantized and contracted in float (with the rule's ``gradients``, both backward contractions
of each on quantized operands, :mod:`qjax.nn.quantized_backward`, keys and values tiled like the
other operand under ``per_block``); in ``serve`` both contractions run on the stored
low-precision operands (int8 x int8 -> int32, or fp8 x fp8 -> f32,
:func:`qjax.kernels.xla.quantized_dot_general`); ``calibrate`` computes in float, as
:func:`grouped_query_attention` does in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from flax.nnx.nn.dtypes import promote_dtype

from qjax.kernels import xla
from qjax.nn.hooks import ATTENTION_HOOK
from qjax.nn.ops import Mode
from qjax.nn.quantized_backward import quantized_backward_dot
from qjax.nn.rules import Rule
from qjax.numerics import QuantSpec, quantize
from qjax.numerics.fields import parse_enum
from qjax.numerics.rounding import needs_key
from qjax.numerics.spec import Granularity
from qjax.ste import fake_quant

# dot_general dimension numbers of the two contractions, G = H / H_kv query heads per key/value head:
# q (B, H_kv, G, T, D) . k (B, S, H_kv, D) -> (B, H_kv, G, T, S)
# v^T (B, H_kv, D, S) . P (B, H_kv, G, T, S) -> (B, H_kv, D, G, T)
_QK = (((4,), (3,)), ((0, 1), (0, 2)))
_VP = (((3,), (4,)), ((0, 1), (0, 1)))

Contraction = Callable[[jax.Array, jax.Array, Any], jax.Array]


def grouped_query_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: nnx.Module | None = None,
    promote_dtype: Any = promote_dtype,
    is_causal: bool = False,
    *,
    contract: Contraction | None = None,
    where: str = "grouped_query_attention",
) -> jax.Array:
    """Attention with the signature and semantics of ``flax.nnx.dot_product_attention``,
    grouped-query without repeating the key / value heads (module docstring): ``query``
    ``(B..., T, H, D)``, ``key`` and ``value`` ``(B..., S, H_kv, D)`` -> ``(B..., T, H, D)`` in
    the promoted dtype of the inputs.

    ``contract(lhs, rhs, dn)`` computes both contractions (float32 result); by default in float:
    :math:`QK^T` accumulates in float32, :math:`P` is cast to the value dtype for :math:`PV`
    (float32 accumulation, operands in the order of ``jnp.einsum("bkgst,btkd->bskgd", P, v)``, so
    the float result is that einsum's). :class:`QuantizedAttention` passes its quantized ones, so a
    rule of ``kind='attention'`` may replace this function by it; ``where`` names the caller in
    errors."""
    contract = contract or _float_contraction(precision)
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    out_dtype = query.dtype
    lead = query.shape[:-3]
    q, k, v = (jnp.reshape(a, (math.prod(lead), *a.shape[-3:])) for a in (query, key, value))
    b, t, heads, d = q.shape
    kv_heads = k.shape[-2]
    if heads % kv_heads or v.shape[-2] != kv_heads:
        raise ValueError(
            f"{where}: {heads} query heads are not a multiple of {kv_heads} key heads (or the value "
            f"heads, {v.shape[-2]}, differ from the key heads); use H_kv dividing H"
        )
    groups = heads // kv_heads
    q = jnp.transpose(q.reshape(b, t, kv_heads, groups, d), (0, 2, 3, 1, 4))  # (B, H_kv, G, T, D)
    logits = contract(q, k, _QK) / np.float32(math.sqrt(d))  # (B, H_kv, G, T, S)
    logits = logits.reshape(b, heads, t, -1)  # (B, H, T, S): head h = kv * G + g
    weights = _masked_softmax(logits, bias, mask, is_causal)
    if module is not None:
        module.sow(nnx.Intermediate, "attention_weights", weights.astype(out_dtype))
    if not deterministic and dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError(f"{where}: attention dropout needs a dropout_rng")
        shape = (1, 1, *weights.shape[-2:]) if broadcast_dropout else weights.shape
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    grouped = weights.reshape(b, kv_heads, groups, t, -1)
    out = contract(jnp.transpose(v, (0, 2, 3, 1)), grouped, _VP)  # (B, H_kv, D, G, T)
    out = jnp.transpose(out, (0, 4, 1, 3, 2)).reshape(b, t, heads, -1)
    return jnp.reshape(out, (*lead, *out.shape[1:])).astype(out_dtype)


def _float_contraction(precision: Any) -> Contraction:
    def contract(lhs: jax.Array, rhs: jax.Array, dn: Any) -> jax.Array:  # rhs: k, or P to cast
        return jax.lax.dot_general(
            lhs, rhs.astype(lhs.dtype), dn, precision=precision, preferred_element_type=jnp.float32
        )

    return contract


def _masked_softmax(
    logits: jax.Array, bias: jax.Array | None, mask: jax.Array | None, is_causal: bool
) -> jax.Array:
    """The float32 attention weights ``(B, H, T, S)`` of ``logits``: bias added, masked logits set
    to the float32 minimum (Flax's ``dot_product_attention_weights``)."""
    if bias is not None:
        logits = logits + (jnp.reshape(bias, (-1, *bias.shape[-3:])) if bias.ndim > 4 else bias)
    if is_causal:
        t, s = logits.shape[-2:]
        causal = jnp.tril(jnp.ones((t, s), jnp.bool_), k=s - t)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        if mask.ndim > 4:
            mask = jnp.reshape(mask, (-1, *mask.shape[-3:]))
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


REPLACEABLE_ATTENTION: tuple[Callable[..., jax.Array], ...] = (
    nnx.dot_product_attention,
    grouped_query_attention,
)
"""The attention functions a rule of ``kind='attention'`` replaces: those whose float math
:class:`QuantizedAttention` reproduces."""


class QuantizedAttention(nnx.Module):
    """An attention layer's ``attention_fn`` (the attention protocol, module docstring) with
    quantized :math:`QK^T` and :math:`PV`. Holds no trained state: the scales are dynamic.

    Attributes:
      path: the attention layer's path in the model.
      rule: the ``kind='attention'`` :class:`~qjax.nn.Rule` that selected it.
      mode: :class:`~qjax.nn.Mode` ``qat``, ``calibrate`` or ``serve``.
    """

    def __init__(self, path: str, rule: Rule, mode: Mode | str, seed: int = 0):
        self.path = path
        self.rule = rule
        self.mode = parse_enum(Mode, mode, "mode")
        grads = rule.gradients
        # stochastic rounding of the gradients draws from the layer's own stream
        self.rngs = nnx.Rngs(quantize=seed) if grads is not None and needs_key(grads.rounding) else None

    def __call__(
        self, query: jax.Array, key: jax.Array, value: jax.Array, *args: Any, **kwargs: Any
    ) -> jax.Array:
        """The arguments of ``flax.nnx.dot_product_attention``: :func:`grouped_query_attention` with
        this op's contractions (``precision`` is not used)."""
        return grouped_query_attention(
            query, key, value, *args, contract=self._contract, where=f"layer {self.path!r}", **kwargs
        )

    def _contract(self, lhs: jax.Array, rhs: jax.Array, dn: Any) -> jax.Array:
        """``dot_general(lhs, rhs, dn)`` in float32 on the mode's operands; both operands have
        the contracted axis last."""
        spec = self.rule.activations
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
        if self.mode == Mode.CALIBRATE or spec is None:
            return jax.lax.dot_general(lhs, rhs, dn)
        spec = _operand_spec(spec)
        if self.mode == Mode.QAT:
            est = self.rule.activation_estimator
            lhs, rhs = fake_quant(lhs, spec, est), fake_quant(rhs, spec, est)
            grads = self.rule.gradients
            if grads is None:
                return jax.lax.dot_general(lhs, rhs, dn)
            key = self.rngs.quantize() if self.rngs is not None else None
            return quantized_backward_dot(dn, grads, False, lhs, rhs, key, None)
        if self.mode != Mode.SERVE:
            raise ValueError(f"layer {self.path!r}: unknown mode {str(self.mode)!r}")
        return xla.quantized_dot_general(quantize(lhs, spec), quantize(rhs, spec), dn)


def _operand_spec(spec: QuantSpec) -> QuantSpec:
    """The spec each operand is quantized with: ``per_token`` reduces over the last (contracted)
    axis, ``per_tensor`` over everything."""
    if spec.granularity not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
        raise ValueError(f"attention operands are quantized per_tensor or per_token; got {spec.granularity}")
    return spec


def check_attention_layer(path: str, layer: nnx.Module) -> None:
    """A ``kind='attention'`` rule replaces only the functions of :data:`REPLACEABLE_ATTENTION`."""
    fn = getattr(layer, ATTENTION_HOOK.hook, None)
    if isinstance(fn, QuantizedAttention):
        raise ValueError(f"layer {path!r} is already quantized; quantize the float model")
    if not any(fn is known for known in REPLACEABLE_ATTENTION):
        name = getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(
            f"layer {path!r} uses its own attention_fn {name!r}; a rule of kind='attention' replaces "
            "flax's nnx.dot_product_attention or qjax.nn.grouped_query_attention only (the functions "
            "whose math QuantizedAttention reproduces): build the layer with one of them, or exclude "
            "it from the attention rule"
        )
