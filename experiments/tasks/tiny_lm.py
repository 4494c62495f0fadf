"""A byte-level language model trained from scratch on the ``pydoc_data.topics`` text.

Data: the text :math:`s` = ``"\\n".join(topics[k] for k in sorted(topics))`` of the running
CPython's ``pydoc_data.topics`` (about 466 KB as UTF-8; it changes between Python versions, which
the checksum, SHA-256 of the bytes, records). Tokens are its UTF-8 bytes (vocabulary 256). The last
10% of the bytes (``n // 10``) are the validation split, the rest the training split.

Examples are windows of :data:`CONTEXT` = 128 bytes with their next-byte targets,
:math:`x = s[o : o + T]`, :math:`y = s[o + 1 : o + T + 1]`, gathered with one index array:

- training: one window per :data:`TRAIN_STRIDE` = 64 bytes, at offset :math:`o_i = 64 i + j_i` with a
  fixed jitter :math:`j_i \\sim U\\{0..63\\}` (``default_rng(0)``): every training byte is covered, at
  varied alignments. ``Task.train`` is this fixed array of windows, so the runner's shuffled
  ``batch_indices`` loop over examples works unchanged (an "epoch" = one pass over the windows, about
  two passes over the bytes);
- validation: the non-overlapping windows :math:`o = T k` that fit in the split.

Metrics: with :math:`\\ell_t = -\\log p(y_t \\mid x_{\\le t})` over all predicted bytes,
``loss`` :math:`= \\bar\\ell` (nats per byte), ``perplexity`` :math:`= e^{\\bar\\ell}` (256 for uniform
predictions), ``accuracy`` = top-1 next-byte accuracy.
"""

from __future__ import annotations

import hashlib
import math
import platform

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments.tasks import classification_loss, classification_metrics
from experiments.tasks.base import Split, Task

VOCAB = 256
CONTEXT = 128
TRAIN_STRIDE = 64
WINDOW_SEED = 0


def load_text() -> bytes:
    """The UTF-8 bytes of the ``pydoc_data.topics`` text (see the module docstring)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def windows(data: np.ndarray, offsets: np.ndarray, context: int = CONTEXT) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` int32 of shape (len(offsets), context): ``x[i] = data[o_i : o_i + context]`` and
    ``y[i] = data[o_i + 1 : o_i + context + 1]``, gathered with one fancy index."""
    w = data[offsets[:, None] + np.arange(context + 1)].astype(np.int32)  # (N, context + 1)
    return w[:, :-1], w[:, 1:]


def train_offsets(
    n: int, context: int = CONTEXT, stride: int = TRAIN_STRIDE, seed: int = WINDOW_SEED
) -> np.ndarray:
    """Offsets :math:`o_i = i \\cdot stride + j_i`, :math:`j_i \\in [0, stride)`, all with
    :math:`o_i + context + 1 \\le n`."""
    base = np.arange(0, n - context - stride + 1, stride)
    return base + np.random.default_rng(seed).integers(0, stride, size=len(base))


def split_text(text: bytes) -> tuple[Split, Split]:
    """``(train, validation)`` splits of ``text`` (see the module docstring)."""
    data = np.frombuffer(text, np.uint8)
    cut = len(data) - len(data) // 10
    train, val = data[:cut], data[cut:]
    val_offsets = np.arange(0, len(val) - CONTEXT, CONTEXT)  # o + CONTEXT + 1 <= len(val)
    return Split(*windows(train, train_offsets(len(train)))), Split(*windows(val, val_offsets))


# -- model ----------------------------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with projections ``q``, ``k``, ``v``, ``o`` (no biases):
    :math:`\\mathrm{softmax}(QK^\\top/\\sqrt{d_h} + M)V` with :math:`M_{ts} = -\\infty` for
    :math:`s > t`."""

    def __init__(self, d: int, heads: int, out_std: float, *, rngs: nnx.Rngs):
        if d % heads:
            raise ValueError(f"heads={heads} does not divide d={d}; use a divisor of {d}")
        init = nnx.initializers.normal(0.02)
        self.heads = heads
        self.q = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.k = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.v = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.o = nnx.Linear(d, d, use_bias=False, kernel_init=nnx.initializers.normal(out_std), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (B, T, d)
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # (B, T, H, d_h)
        att = jax.nn.dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.o(att.reshape(b, t, d))


class Block(nnx.Module):
    """Pre-norm transformer block: :math:`h \\mathrel{+}= \\mathrm{attn}(\\mathrm{LN}_1 h)`,
    :math:`h \\mathrel{+}= \\mathrm{fc2}(\\mathrm{gelu}(\\mathrm{fc1}(\\mathrm{LN}_2 h)))`."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, out_std: float, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = CausalSelfAttention(d, heads, out_std, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, mlp_ratio * d, kernel_init=init, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_ratio * d, d, kernel_init=nnx.initializers.normal(out_std), rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.attn(self.norm1(h))
        return h + self.fc2(jax.nn.gelu(self.fc1(self.norm2(h))))


class TransformerLM(nnx.Module):
    """Decoder-only byte-level transformer: token + learned position embeddings, ``layers`` pre-norm
    blocks, final LayerNorm, linear head to 256 logits.

    Layer paths: ``embed``, ``pos``, ``blocks/{i}/attn/{q,k,v,o}``, ``blocks/{i}/fc1``,
    ``blocks/{i}/fc2``, ``head``. Initialisation as GPT-2: normal(0.02), residual projections
    (``o``, ``fc2``) normal(0.02 / sqrt(2 layers)), so an untrained model predicts nearly uniformly.
    """

    def __init__(
        self,
        d: int = 128,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        context: int = CONTEXT,
        *,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(0.02)
        out_std = 0.02 / math.sqrt(2 * layers)
        self.context = context
        self.embed = nnx.Embed(VOCAB, d, embedding_init=init, rngs=rngs)
        self.pos = nnx.Embed(context, d, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, mlp_ratio, out_std, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, VOCAB, kernel_init=init, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # tokens: (B, T) int -> logits (B, T, 256)
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context={self.context}")
        h = self.embed(tokens) + self.pos(jnp.arange(t))[None]  # (B, T, d)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


MODELS = {"transformer": TransformerLM}


# -- loss and metrics -----------------------------------------------------------------------------


def lm_finish(totals: dict[str, float]) -> dict[str, float]:
    """``loss`` (nats per byte), ``perplexity`` = exp(loss), ``accuracy`` (next byte, top-1)."""
    loss = totals["loss_sum"] / totals["count"]
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": totals["correct"] / totals["count"]}


def make_task(data_dir: str | None = None) -> Task:
    """The tiny-LM :class:`Task` (``data_dir`` is ignored: the text ships with CPython)."""
    text = load_text()
    train, val = split_text(text)
    return Task(
        name="tiny_lm",
        train=train,
        test=val,
        models=dict(MODELS),
        loss=classification_loss,  # next-byte cross-entropy over the B x T predictions
        metrics=classification_metrics,
        finish=lm_finish,
        checksum=hashlib.sha256(text).hexdigest(),
        description=(
            f"pydoc_data.topics of Python {platform.python_version()}: {len(text)} UTF-8 bytes, last 10% "
            f"for validation; {len(train)} training windows of {CONTEXT} bytes (stride {TRAIN_STRIDE}, "
            f"jittered), {len(val)} non-overlapping validation windows"
        ),
    )
