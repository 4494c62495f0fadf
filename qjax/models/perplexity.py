"""The perplexity protocol for language models, on CPython's ``pydoc_data.topics`` text.

Protocol (the defaults of :class:`PerplexityConfig`):

- text: ``"\\n".join(topics[k] for k in sorted(topics))`` of :mod:`pydoc_data.topics` (ships with
  every CPython), tokenized without BOS (:func:`pydoc_text`);
- evaluation: the first ``n_windows = 16`` non-overlapping windows of ``window = 512`` tokens from
  the start of the text; in each, positions :math:`1..511` are predicted from the tokens before them
  (511 predictions per window, the first token of a window is context only);
- calibration (for PTQ methods): ``n`` windows taken from the end of the text
  (:func:`calibration_windows`), disjoint from the evaluation windows.

.. math::

    \\mathrm{NLL} = -\\frac{1}{N (L - 1)} \\sum_{w=1}^{N} \\sum_{t=1}^{L-1}
        \\log p_\\theta(x^{(w)}_t \\mid x^{(w)}_{<t}), \\qquad \\mathrm{ppl} = e^{\\mathrm{NLL}}

with per-token log-probabilities from a float32 log-softmax, summed on the host in float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.fields import SpecError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    """Evaluation windows: ``n_windows`` non-overlapping windows of ``window`` tokens starting at
    token ``start``. A bad field raises :class:`~qjax.numerics.fields.SpecError` naming it."""

    window: int = 512
    n_windows: int = 16
    start: int = 0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise SpecError(
                f"window={self.window} must be >= 2 (one context token and one prediction)", field="window"
            )
        if self.n_windows < 1:
            raise SpecError(f"n_windows={self.n_windows} must be >= 1", field="n_windows")
        if self.start < 0:
            raise SpecError(f"start={self.start} must be >= 0", field="start")

    @property
    def end(self) -> int:
        """One past the last token the evaluation reads."""
        return self.start + self.window * self.n_windows


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(mean_nll)`` over ``n_predictions`` tokens in ``n_windows`` windows."""

    perplexity: float
    mean_nll: float
    n_predictions: int
    n_windows: int


def pydoc_text() -> str:
    """The protocol's text: every :mod:`pydoc_data.topics` entry, sorted by key, joined by newlines."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """``text`` as int32 token ids (1-D) with a ``tokenizers.Tokenizer``, no BOS/EOS added."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def eval_windows(tokens: np.ndarray, config: PerplexityConfig = PerplexityConfig()) -> np.ndarray:
    """The evaluation windows (n_windows, window) int32 of a 1-D token array."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens has shape {tokens.shape}; pass a 1-D array of token ids")
    if len(tokens) < config.end:
        raise ValueError(
            f"{len(tokens)} tokens are too few for {config.n_windows} windows of {config.window} from "
            f"start={config.start} (need {config.end}); lower n_windows or window"
        )
    return tokens[config.start : config.end].reshape(config.n_windows, config.window).astype(np.int32)


def calibration_windows(
    tokens: np.ndarray, n: int, length: int = 512, *, reserved: int = PerplexityConfig().end
) -> np.ndarray:
    """``n`` non-overlapping calibration windows (n, length) int32 from the end of ``tokens``, in
    text order. ``reserved`` is the number of leading tokens kept for evaluation (default: those of
    the default :class:`PerplexityConfig`); the windows must not reach into them."""
    tokens = np.asarray(tokens)
    if n < 1 or length < 1:
        raise ValueError(f"n={n} and length={length} must be >= 1")
    first = len(tokens) - n * length
    if first < reserved:
        raise ValueError(
            f"{n} calibration windows of {length} tokens need {n * length} tokens after the "
            f"{reserved} reserved for evaluation; the text has {len(tokens)}: lower n or length"
        )
    return tokens[first:].reshape(n, length).astype(np.int32)


def token_nll(model: nnx.Module, windows: jax.Array) -> jax.Array:
    """Per-token NLL (B, L-1) float32 of ``windows`` (B, L): :math:`\\log\\sum_v e^{z_v} - z_{x_t}`.

    Each window runs through ``model`` in a forward of its own (``lax.map`` over the batch), so
    whatever a quantized model computes per call (dynamic per-tensor activation scales, the outlier
    columns of LLM.int8()) is computed per sequence, and the result does not depend on how the
    windows are batched."""

    def window_nll(window: jax.Array) -> jax.Array:
        logits = model(window[None])[0, :-1].astype(jnp.float32)  # (L-1, V) predicts positions 1..L-1
        target = jnp.take_along_axis(logits, window[1:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - target

    return jax.lax.map(window_nll, windows)


_jitted_token_nll = nnx.jit(token_nll)


def evaluate_perplexity(
    model: nnx.Module,
    tokens: np.ndarray,
    config: PerplexityConfig = PerplexityConfig(),
    *,
    batch_size: int = 4,
) -> PerplexityResult:
    """Perplexity of ``model`` (tokens (B, L) -> logits (B, L, V)) on the evaluation windows of the
    1-D ``tokens`` (see the module docstring). ``batch_size`` windows run per jitted call."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    windows = eval_windows(tokens, config)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        nll = np.asarray(_jitted_token_nll(model, jnp.asarray(windows[i : i + batch_size])), np.float64)
        total += float(nll.sum())
        count += nll.size
    mean = total / count
    return PerplexityResult(
        perplexity=math.exp(mean), mean_nll=mean, n_predictions=count, n_windows=len(windows)
    )
