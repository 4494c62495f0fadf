"""Quantized attention contractions: :math:`QK^T` and :math:`PV` of ``nnx.MultiHeadAttention``.

:class:`QuantizedAttention` is installed as the layer's ``attention_fn`` by a rule of
``kind='attention'``; the four projections are ``LinearGeneral`` layers that ordinary rules cover.
With queries :math:`q` ``(B, T, H, D)``, keys :math:`k` and values :math:`v` ``(B, S, H, D)``:

.. math::

    L_{bhts} = \\frac{1}{\\sqrt D} \\sum_d \\hat q_{bthd} \\hat k_{bshd}, \\qquad
    P = \\operatorname{softmax}_s(L + \\text{bias}, \\text{mask}), \\qquad
    O_{bthd} = \\sum_s \\hat P_{bhts} \\hat v_{bshd}.

Every operand is quantized with the rule's ``activations`` spec, dynamically (each call's range),
with one scale per tensor (``per_tensor``) or per row of the contraction (``per_token``): one per
``(b, t, h)`` for :math:`q`, ``(b, s, h)`` for :math:`k`, ``(b, h, t)`` for :math:`P` and
``(b, h, d)`` for :math:`v` (a scale must be constant along the contracted axis for the integer
contraction to factor it out, so :math:`v`'s "tokens" are its channels). In ``qat`` the operands
are fake-quantized and contracted in float; in ``serve`` both contractions run on the stored
low-precision operands (int8 x int8 -> int32, or fp8 x fp8 -> f32,
:func:`qjax.kernels.xla.quantized_dot_general`); ``calibrate`` computes in float. The softmax,
masking, bias and dropout are Flax's ``dot_product_attention_weights`` semantics, in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
from flax.nnx.nn.dtypes import promote_dtype

from qjax.kernels import xla
from qjax.nn.ops import Mode
from qjax.nn.rules import Rule
from qjax.numerics import QuantSpec, quantize
from qjax.numerics.fields import parse_enum
from qjax.numerics.spec import Granularity
from qjax.ste import fake_quant

# dot_general dimension numbers of the two contractions on 4-d operands:
# q (B, T, H, D) . k (B, S, H, D) -> (B, H, T, S);  P (B, H, T, S) . v^T (B, H, D, S) -> (B, H, T, D)
_QK = (((3,), (3,)), ((0, 2), (0, 2)))
_PV = (((3,), (3,)), ((0, 1), (0, 1)))


class QuantizedAttention(nnx.Module):
    """``nnx.MultiHeadAttention.attention_fn`` with quantized :math:`QK^T` and :math:`PV`
    (module docstring). Holds no trained state: the scales are dynamic.

    Attributes:
      path: the attention layer's path in the model.
      rule: the ``kind='attention'`` :class:`~qjax.nn.Rule` that selected it.
      mode: :class:`~qjax.nn.Mode` ``qat``, ``calibrate`` or ``serve``.
    """

    def __init__(self, path: str, rule: Rule, mode: Mode | str):
        self.path = path
        self.rule = rule
        self.mode = parse_enum(Mode, mode, "mode")

    def __call__(
        self,
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
    ) -> jax.Array:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
        out_dtype = query.dtype
        lead = query.shape[:-3]
        q, k, v = (jnp.reshape(a, (math.prod(lead), *a.shape[-3:])) for a in (query, key, value))
        if q.shape[-2] != k.shape[-2]:  # grouped-query attention: repeat the key / value heads
            if q.shape[-2] % k.shape[-2]:
                raise ValueError(
                    f"layer {self.path!r}: {q.shape[-2]} query heads are not a multiple of "
                    f"{k.shape[-2]} key heads"
                )
            rep = q.shape[-2] // k.shape[-2]
            k, v = jnp.repeat(k, rep, axis=-2), jnp.repeat(v, rep, axis=-2)
        logits = self._contract(q, k, _QK) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
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
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        if module is not None:
            module.sow(nnx.Intermediate, "attention_weights", weights.astype(out_dtype))
        if not deterministic and dropout_rate > 0.0:
            if dropout_rng is None:
                raise ValueError(f"layer {self.path!r}: attention dropout needs a dropout_rng")
            shape = (1, 1, *weights.shape[-2:]) if broadcast_dropout else weights.shape
            keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, shape)
            weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
        out = self._contract(weights, jnp.transpose(v, (0, 2, 3, 1)), _PV)  # (B, H, T, D)
        out = jnp.transpose(out, (0, 2, 1, 3))
        return jnp.reshape(out, (*lead, *out.shape[1:])).astype(out_dtype)

    def _contract(self, lhs: jax.Array, rhs: jax.Array, dn: Any) -> jax.Array:
        """``dot_general(lhs, rhs, dn)`` in float32 on the mode's operands; both operands are
        4-d with the contracted axis last."""
        spec = self.rule.activations
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
        if self.mode == Mode.CALIBRATE or spec is None:
            return jax.lax.dot_general(lhs, rhs, dn)
        spec = _operand_spec(spec)
        if self.mode == Mode.QAT:
            est = self.rule.activation_estimator
            return jax.lax.dot_general(fake_quant(lhs, spec, est), fake_quant(rhs, spec, est), dn)
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
    """A ``kind='attention'`` rule replaces Flax's own ``dot_product_attention`` only."""
    fn = getattr(layer, "attention_fn", None)
    if isinstance(fn, QuantizedAttention):
        raise ValueError(f"layer {path!r} is already quantized; quantize the float model")
    if fn is not nnx.dot_product_attention:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(
            f"layer {path!r} uses its own attention_fn {name!r}; a rule of kind='attention' replaces "
            "flax's nnx.dot_product_attention only: build the layer with the default attention_fn, "
            "or exclude it from the attention rule"
        )
