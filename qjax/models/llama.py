"""A Llama-family decoder (Llama 2/3, SmolLM2, ...) as a Flax NNX module.

Pre-norm blocks with RMSNorm, grouped-query attention with rotary position embeddings and a SwiGLU
MLP. Every projection is an ``nnx.Linear`` (no biases) so that :func:`qjax.nn.quantize_model`
rules match them by path:

.. code-block:: text

    embed                                   nnx.Embed (vocab, dim)
    layers/{i}/attn_norm                    RMSNorm
    layers/{i}/attn                         Attention (attention_fn: QK^T and PV, kind='attention')
    layers/{i}/attn/{q,k,v,o}_proj          nnx.Linear
    layers/{i}/mlp_norm                     RMSNorm
    layers/{i}/mlp/{gate,up,down}_proj      nnx.Linear
    norm                                    RMSNorm
    lm_head                                 nnx.Linear (only when embeddings are untied)

Two optional online rotations (off by default; :func:`qjax.methods.rotate_llama` turns them on for
a model whose weights it rotated to match): with ``down_hadamard`` the MLP multiplies
``silu(gate) * up`` by the normalized Hadamard matrix :math:`H_{hidden} / \\sqrt{hidden}` before
``down_proj`` (so a quantized ``down_proj`` quantizes the rotated input), and with ``qk_hadamard``
every query and key head is multiplied by :math:`H_{d_h} / \\sqrt{d_h}` after the rotary embedding
(so the KV cache stores rotated keys). Both are :func:`qjax.numerics.hadamard_transform`, never a
dense matrix.

Rotary layout: the Hugging Face "rotate_half" convention. Within each head the first half of the
features pairs with the second half (feature ``j`` with ``j + d_h/2``). llama.cpp (GGUF) uses the
interleaved convention (``2j`` with ``2j + 1``) and stores the q/k weight rows permuted to match;
:mod:`qjax.models.gguf_loader` undoes that permutation when loading.

Layer-wise calibration runs one block at a time:

.. code-block:: python

    h = model.embed_tokens(tokens)            # (B, T, dim)
    for block in model.layers:
        h = block(h)                          # same as block_forward(model, i, h)
    logits = model.output_logits(h)           # (B, T, vocab) float32
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from qjax.nn.attention import grouped_query_attention
from qjax.numerics import QuantSpec, quantize_dequantize
from qjax.numerics.fields import SpecError
from qjax.numerics.formats import FloatFormat, IntFormat, parse_format
from qjax.numerics.hadamard import hadamard_transform, is_hadamard_order


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyperparameters of a Llama-family model. A bad field raises
    :class:`~qjax.numerics.fields.SpecError` (a ``ValueError``) whose ``field`` names it.

    Attributes:
      vocab_size: number of tokens.
      dim: model width :math:`d`.
      n_layers: number of blocks.
      n_heads: query heads :math:`H`; the head width is :math:`d_h = d / H`.
      n_kv_heads: key/value heads :math:`H_{kv}` (grouped-query attention; divides ``n_heads``).
      hidden_dim: SwiGLU hidden width.
      norm_eps: RMSNorm :math:`\\epsilon`.
      rope_theta: rotary base :math:`\\theta`.
      max_seq_len: longest sequence the model accepts.
      tie_embeddings: the LM head is the transposed token embedding (no ``lm_head`` layer).
      down_hadamard: ``down_proj`` reads :math:`z H / \\sqrt{n}` with :math:`z = \\mathrm{silu}(
        \\mathrm{gate}(x)) \\odot \\mathrm{up}(x)` and :math:`H` = :func:`qjax.numerics.hadamard`
        ``(hidden_dim)``, :math:`n` = ``hidden_dim`` (an online rotation; a model keeps its function
        only if ``down_proj``'s kernel holds :math:`H^\\top W / \\sqrt{n}`:
        :func:`qjax.methods.rotate_llama`).
      qk_hadamard: queries and keys are multiplied per head by :math:`H_{d_h} / \\sqrt{d_h}` after the
        rotary embedding (scores unchanged: :math:`H H^\\top = d_h I`).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    down_hadamard: bool = False
    qk_hadamard: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SpecError(f"LlamaConfig {name}={value!r} must be a positive integer", field=name)
        if self.dim % self.n_heads:
            raise SpecError(
                f"n_heads={self.n_heads} does not divide dim={self.dim}; use a divisor of it", field="n_heads"
            )
        if self.n_heads % self.n_kv_heads:
            raise SpecError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; use a divisor of it",
                field="n_kv_heads",
            )
        if self.head_dim % 2:
            raise SpecError(
                f"head_dim={self.head_dim} (dim / n_heads) must be even for rotary embeddings",
                field="n_heads",
            )
        for name, dim, size in (
            ("down_hadamard", "hidden_dim", self.hidden_dim),
            ("qk_hadamard", "head_dim", self.head_dim),
        ):
            if getattr(self, name) and not is_hadamard_order(size):
                raise SpecError(
                    f"{name}=True needs a Hadamard matrix of order {dim}={size}, which is not built "
                    f"here (qjax.numerics.hadamard_factors({size}) says why); set {name}=False",
                    field=name,
                )
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise SpecError(
                f"norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be positive",
                field="norm_eps" if not self.norm_eps > 0 else "rope_theta",
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head, :math:`G = H / H_{kv}`."""
        return self.n_heads // self.n_kv_heads


SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    hidden_dim=1536,
    norm_eps=1e-5,
    rope_theta=1e5,
    max_seq_len=8192,
    tie_embeddings=True,
)

TINY = LlamaConfig(
    vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128
)
"""A tiny random configuration for tests."""


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned gain, computed in float32:

    .. math::

        y = \\frac{x}{\\sqrt{\\tfrac{1}{d} \\sum_j x_j^2 + \\epsilon}} \\odot w
    """

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (y * w).astype(x.dtype)


def rope_angles(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of the rotary angles, each (length, head_dim / 2) float32:
    :math:`\\phi_{t,j} = t\\, \\theta^{-2j/d_h}` for position :math:`t` and pair :math:`j`."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` (B, T, heads, d_h) in the "rotate_half" layout: with :math:`x = [a, b]` split
    into halves along the features,

    .. math::

        \\mathrm{RoPE}(x)_t = [a \\cos\\phi_t - b \\sin\\phi_t,\\; b \\cos\\phi_t + a \\sin\\phi_t]

    so :math:`\\langle \\mathrm{RoPE}(q)_s, \\mathrm{RoPE}(k)_t \\rangle` depends on :math:`s - t`
    only. Computed in float32, returned in ``x.dtype``."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    a, b = x32[..., :half], x32[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, d_h/2)
    return jnp.concatenate([a * c - b * s, b * c + a * s], axis=-1).astype(x.dtype)


KV_GRANULARITIES = ("per_token", "per_head")


@dataclasses.dataclass(frozen=True)
class KVCacheQuant:
    """How the attention's key / value cache is stored: keys (after the rotary embedding) and
    values are quantized to ``dtype`` (symmetric, nearest rounding) and read back dequantized.

    ``granularity``: ``per_token`` gives one scale per (sequence, token, key/value head) over the
    head's ``d_h`` channels (a token's scale depends on that token only, as in a cache appended one
    token at a time); ``per_head`` gives one scale per (sequence, key/value head) over the window's
    tokens and channels (as a cache filled by one prefill of the whole window stores it).
    """

    dtype: str = "int8"
    granularity: str = "per_token"

    def __post_init__(self) -> None:
        if self.granularity not in KV_GRANULARITIES:
            raise SpecError(
                f"KVCacheQuant granularity={self.granularity!r}: use one of {list(KV_GRANULARITIES)}",
                field="granularity",
            )
        fmt = parse_format(self.dtype)
        if not isinstance(fmt, IntFormat | FloatFormat):
            raise SpecError(
                f"KVCacheQuant dtype={self.dtype!r}: the cache stores an integer or float8 format "
                "(e.g. 'int8', 'float8_e4m3fn')",
                field="dtype",
            )

    def apply(self, x: jax.Array) -> jax.Array:
        """The cached tensor ``x`` (B, T, H_kv, d_h) as stored and read back (float, same shape)."""
        if self.granularity == "per_token":
            return quantize_dequantize(x, QuantSpec(dtype=self.dtype, granularity="per_token"))
        heads_first = jnp.transpose(x, (0, 2, 1, 3))  # (B, H_kv, T, d_h): one block per (b, h)
        spec = QuantSpec(dtype=self.dtype, granularity="per_block", block_shape=heads_first.shape[-2:])
        return jnp.transpose(quantize_dequantize(heads_first, spec), (0, 2, 1, 3))


def set_kv_cache(model: nnx.Module, kv: KVCacheQuant | None) -> nnx.Module:
    """Store the key / value cache of every :class:`Attention` of ``model`` as ``kv`` (``None``:
    float), in place; returns ``model``. A static setting: a jitted forward retraces for it."""
    if kv is not None and not isinstance(kv, KVCacheQuant):
        raise TypeError(f"kv must be a qjax.models.KVCacheQuant or None; got {type(kv).__name__}")
    found = [node for _, node in nnx.iter_graph(model) if isinstance(node, Attention)]
    if not found:
        raise ValueError("the model has no qjax.models.llama.Attention layer to store a KV cache for")
    for attention in found:
        attention.kv_cache = kv
    return model


def _linear(d_in: int, d_out: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.initializers.normal(0.02)
    return nnx.Linear(
        d_in, d_out, use_bias=False, dtype=dtype, param_dtype=dtype, kernel_init=init, rngs=rngs
    )


class Attention(nnx.Module):
    """Causal grouped-query attention. Query head :math:`h` reads key/value head
    :math:`\\lfloor h / G \\rfloor`:

    .. math::

        o_h = \\mathrm{softmax}\\!\\left(\\frac{\\mathrm{RoPE}(Q_h)\\, \\mathrm{RoPE}(K_{h/G})^\\top}
              {\\sqrt{d_h}} + M\\right) V_{h/G}, \\qquad M_{ts} = -\\infty \\text{ for } s > t

    and the output is :math:`[o_1, \\dots, o_H] W_o`. Scores and softmax are float32. With
    ``config.qk_hadamard``, :math:`\\mathrm{RoPE}(Q_h)` and :math:`\\mathrm{RoPE}(K_h)` are
    multiplied by :math:`H_{d_h} / \\sqrt{d_h}` (orthogonal: the scores are unchanged). With
    ``kv_cache`` set (:func:`set_kv_cache`), the keys (as just described) and :math:`V` are read as
    the quantized cache would return them (:class:`KVCacheQuant`).

    The two contractions are ``attention_fn`` (qjax's attention protocol,
    :mod:`qjax.nn.attention`), called as ``attention_fn(q, k, v, is_causal=True,
    deterministic=True)`` with ``q`` ``(B, T, H, d_h)`` and ``k``, ``v`` ``(B, T, H_kv, d_h)``
    (the rotary embedding and the cache simulation applied, the key / value heads not repeated).
    It is :func:`qjax.nn.grouped_query_attention` by default; a rule of ``kind='attention'``
    (:func:`qjax.nn.quantize_model`) replaces it by a :class:`qjax.nn.QuantizedAttention`.
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.kv_cache: KVCacheQuant | None = None
        self.attention_fn: Callable[..., jax.Array] = grouped_query_attention
        self.q_proj = _linear(c.dim, c.n_heads * c.head_dim, dtype, rngs)
        self.k_proj = _linear(c.dim, c.n_kv_heads * c.head_dim, dtype, rngs)
        self.v_proj = _linear(c.dim, c.n_kv_heads * c.head_dim, dtype, rngs)
        self.o_proj = _linear(c.n_heads * c.head_dim, c.dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (B, T, dim)
        c = self.config
        b, t, _ = x.shape
        cos, sin = rope_angles(t, c.head_dim, c.rope_theta)
        q = apply_rope(self.q_proj(x).reshape(b, t, c.n_heads, c.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        if c.qk_hadamard:
            q, k = hadamard_transform(q), hadamard_transform(k)
        if self.kv_cache is not None:
            k, v = self.kv_cache.apply(k), self.kv_cache.apply(v)
        out = self.attention_fn(q, k, v, is_causal=True, deterministic=True)  # (B, T, H, d_h)
        return self.o_proj(out.reshape(b, t, c.n_heads * c.head_dim))


class MLP(nnx.Module):
    """SwiGLU: :math:`\\mathrm{down}(\\mathrm{silu}(\\mathrm{gate}(x)) \\odot \\mathrm{up}(x))` with
    :math:`\\mathrm{silu}(z) = z \\sigma(z)`; with ``config.down_hadamard``,
    :math:`\\mathrm{down}(z H_n / \\sqrt{n})` (:math:`n` = ``hidden_dim``), the transform applied
    before ``down_proj`` is called, so a quantized ``down_proj`` quantizes :math:`z H_n / \\sqrt{n}`."""

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.down_hadamard = config.down_hadamard
        self.gate_proj = _linear(config.dim, config.hidden_dim, dtype, rngs)
        self.up_proj = _linear(config.dim, config.hidden_dim, dtype, rngs)
        self.down_proj = _linear(config.hidden_dim, config.dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        z = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, hidden)
        if self.down_hadamard:
            z = hadamard_transform(z)
        return self.down_proj(z)


class Block(nnx.Module):
    """Pre-norm block: :math:`h \\mathrel{+}= \\mathrm{attn}(\\mathrm{RMSNorm}_a(h))`, then
    :math:`h \\mathrel{+}= \\mathrm{mlp}(\\mathrm{RMSNorm}_m(h))`. Maps (B, T, dim) to (B, T, dim)."""

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.attn(self.attn_norm(h))
        return h + self.mlp(self.mlp_norm(h))


class Llama(nnx.Module):
    """Llama-family causal LM: ``tokens`` (B, T) int -> logits (B, T, vocab) float32.

    ``dtype`` is the dtype of the weights and of the matmuls (float32 by default; ``jnp.bfloat16``
    halves memory); RMSNorm, rotary embeddings, attention scores and logits are float32.
    The module layout and names are listed in the module docstring.
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(
            config.vocab_size, config.dim, dtype=dtype, param_dtype=dtype, embedding_init=init, rngs=rngs
        )
        self.layers = nnx.List([Block(config, dtype=dtype, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = _linear(config.dim, config.vocab_size, dtype, rngs)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings (B, T, dim) in the model's dtype: the input of block 0."""
        t = tokens.shape[-1]
        if t > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds max_seq_len={self.config.max_seq_len}; split the input"
            )
        return self.embed(tokens).astype(self.dtype)

    def output_logits(self, h: jax.Array) -> jax.Array:
        """Final RMSNorm and LM head on the last block's output: (B, T, dim) -> (B, T, vocab) float32."""
        h = self.norm(h)
        logits = self.embed.attend(h) if self.config.tie_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed_tokens(tokens)
        for block in self.layers:
            h = block(h)
        return self.output_logits(h)


def block_forward(model: Llama, index: int, h: jax.Array) -> jax.Array:
    """Run block ``index`` of ``model`` on hidden states ``h`` (B, T, dim)."""
    if not 0 <= index < len(model.layers):
        raise IndexError(f"index={index} is not a block of this model; use 0..{len(model.layers) - 1}")
    return model.layers[index](h)


@dataclasses.dataclass(frozen=True)
class NormGroup:
    """An RMSNorm and the linears that read its output: scaling input channel :math:`j` of every
    linear by :math:`s_j` and dividing the norm's ``weight[j]`` by :math:`s_j` leaves the block's
    function unchanged (SmoothQuant, AWQ)."""

    norm_path: str
    norm: RMSNorm
    linear_paths: tuple[str, ...]
    linears: tuple[nnx.Linear, ...]


@dataclasses.dataclass(frozen=True)
class LinearPair:
    """A linear ``prev`` whose output channels feed the input channels of ``next`` through an
    operation that commutes with a per-channel scale (the attention-weighted sum of values, or the
    elementwise product with ``silu(gate)``): dividing ``prev``'s output channel :math:`j` by
    :math:`s_j` and multiplying the matching input rows of ``next`` by :math:`s_j` is exact.

    ``kv_groups`` maps the scale across grouped-query attention: ``v_proj`` has
    :math:`H_{kv} d_h` outputs but ``o_proj`` has :math:`H d_h` inputs; query head :math:`h` reads
    value head :math:`\\lfloor h/G \\rfloor`, so the input scale is :meth:`next_input_scale`.

    ``scalable`` is ``False`` where an online rotation sits between the two
    (:attr:`LlamaConfig.down_hadamard` between ``up_proj`` and ``down_proj``): no per-channel
    scale passes through it, so none may be folded from ``next`` into ``prev``.
    """

    prev_path: str
    prev: nnx.Linear
    next_path: str
    next: nnx.Linear
    kv_groups: int = 1
    head_dim: int = 1
    scalable: bool = True

    def next_input_scale(self, s: jax.Array) -> jax.Array:
        """The scale for ``next``'s input channels given the scale ``s`` of ``prev``'s outputs."""
        if self.kv_groups == 1:
            return s
        heads = s.reshape(-1, 1, self.head_dim)  # (H_kv, 1, d_h)
        return jnp.broadcast_to(heads, (heads.shape[0], self.kv_groups, self.head_dim)).reshape(-1)


@dataclasses.dataclass(frozen=True)
class BlockGroups:
    """The scale-equivalent structure of one block, for SmoothQuant / AWQ style methods."""

    index: int
    norm_groups: tuple[NormGroup, ...]
    linear_pairs: tuple[LinearPair, ...]


def smoothing_groups(model: Llama) -> list[BlockGroups]:
    """Per block: the norm groups ``attn_norm -> (q, k, v)`` and ``mlp_norm -> (gate, up)``, and the
    linear pairs ``v_proj -> o_proj`` (with the grouped-query mapping) and ``up_proj -> down_proj``."""
    c = model.config
    out = []
    for i, blk in enumerate(model.layers):
        p = f"layers/{i}"
        attn, mlp = blk.attn, blk.mlp
        norms = (
            NormGroup(
                f"{p}/attn_norm",
                blk.attn_norm,
                tuple(f"{p}/attn/{n}_proj" for n in "qkv"),
                (attn.q_proj, attn.k_proj, attn.v_proj),
            ),
            NormGroup(
                f"{p}/mlp_norm",
                blk.mlp_norm,
                (f"{p}/mlp/gate_proj", f"{p}/mlp/up_proj"),
                (mlp.gate_proj, mlp.up_proj),
            ),
        )
        pairs = (
            LinearPair(
                f"{p}/attn/v_proj", attn.v_proj, f"{p}/attn/o_proj", attn.o_proj, c.kv_groups, c.head_dim
            ),
            LinearPair(
                f"{p}/mlp/up_proj",
                mlp.up_proj,
                f"{p}/mlp/down_proj",
                mlp.down_proj,
                scalable=not c.down_hadamard,
            ),
        )
        out.append(BlockGroups(i, norms, pairs))
    return out


def model_weights(model: Llama) -> dict[str, np.ndarray]:
    """Every parameter of ``model`` as a float32 numpy array keyed by its path, e.g.
    ``layers/0/attn/q_proj/kernel`` (in, out), ``layers/0/attn_norm/weight``, ``embed/embedding``."""
    out = {}
    for parts, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            out["/".join(str(p) for p in parts)] = np.asarray(node.get_value(), np.float32)
    return out


def llama_from_weights(
    config: LlamaConfig, weights: dict[str, np.ndarray], *, dtype: Any = jnp.float32
) -> Llama:
    """A :class:`Llama` whose parameters are ``weights`` (paths and layouts as :func:`model_weights`).

    Raises ``KeyError`` naming the missing parameters, ``ValueError`` for a shape mismatch or for
    weights the model has no place for."""
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    params = {
        "/".join(str(p) for p in parts): node
        for parts, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Param)
    }
    missing = sorted(set(params) - set(weights))
    if missing:
        raise KeyError(f"weights are missing {len(missing)} parameters: {missing[:5]}")
    extra = sorted(set(weights) - set(params))
    if extra:
        raise ValueError(f"weights has {len(extra)} parameters the model lacks: {extra[:5]}")
    for path, var in params.items():
        abstract = var.get_value()
        value = np.asarray(weights[path])
        if value.shape != abstract.shape:
            raise ValueError(f"parameter {path} has shape {value.shape}; the config needs {abstract.shape}")
        var.set_value(jnp.asarray(value, abstract.dtype))
    return model
