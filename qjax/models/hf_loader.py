"""Load and save a Llama model as a Hugging Face directory: ``config.json`` (``LlamaForCausalLM``)
and ``*.safetensors`` weights.

Hugging Face stores a linear weight as (out, in) (``torch.nn.Linear``); ``nnx.Linear.kernel`` is
(in, out), so matrices are transposed. Both use the "rotate_half" rotary layout, so q/k rows need
no permutation (unlike GGUF, see :mod:`qjax.models.gguf_loader`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from qjax.models.files import require_finite
from qjax.models.llama import Llama, LlamaConfig, llama_from_weights, model_weights

# HF name (per block, under model.layers.{i}.) -> qjax path (per block, under layers/{i}/).
_BLOCK_NAMES = {
    "self_attn.q_proj.weight": "attn/q_proj/kernel",
    "self_attn.k_proj.weight": "attn/k_proj/kernel",
    "self_attn.v_proj.weight": "attn/v_proj/kernel",
    "self_attn.o_proj.weight": "attn/o_proj/kernel",
    "mlp.gate_proj.weight": "mlp/gate_proj/kernel",
    "mlp.up_proj.weight": "mlp/up_proj/kernel",
    "mlp.down_proj.weight": "mlp/down_proj/kernel",
    "input_layernorm.weight": "attn_norm/weight",
    "post_attention_layernorm.weight": "mlp_norm/weight",
}


def _hf_names(config: LlamaConfig) -> dict[str, str]:
    """HF tensor name -> qjax parameter path."""
    names = {"model.embed_tokens.weight": "embed/embedding", "model.norm.weight": "norm/weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head/kernel"
    for i in range(config.n_layers):
        for hf, q in _BLOCK_NAMES.items():
            names[f"model.layers.{i}.{hf}"] = f"layers/{i}/{q}"
    return names


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """The :class:`LlamaConfig` of a ``LlamaForCausalLM`` ``config.json`` (as a dict)."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] != "LlamaForCausalLM" or hf.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json architectures={archs} is not supported; only LlamaForCausalLM")
    if hf.get("rope_scaling"):
        raise ValueError(
            f"config.json rope_scaling={hf['rope_scaling']!r} is not supported; only unscaled RoPE"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"config.json {key}=true is not supported; this Llama has no biases")
    try:
        heads = int(hf["num_attention_heads"])
        config = LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            hidden_dim=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise KeyError(f"config.json lacks the LlamaForCausalLM field {e.args[0]!r}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != config.head_dim:
        raise ValueError(
            f"config.json head_dim={head_dim} != hidden_size / num_attention_heads; not supported"
        )
    return config


def load_hf(directory: str | os.PathLike[str], dtype: Any = jnp.float32) -> tuple[Llama, LlamaConfig]:
    """``(model, config)`` from a Hugging Face Llama directory (``config.json`` + ``*.safetensors``)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"directory={str(directory)!r} has no config.json; pass a Hugging Face model folder"
        )
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"directory={str(directory)!r} has no *.safetensors weights")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as e:  # safetensors raises its own SafetensorError for a short or bad header
            raise ValueError(
                f"{f}: not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated or "
                "damaged: download or export it again"
            ) from None
    weights = {}
    for hf, q in _hf_names(config).items():
        if hf not in tensors:
            raise KeyError(f"safetensors in {str(directory)!r} lack the tensor {hf!r}")
        w = require_finite(np.asarray(tensors[hf], np.float32), hf, directory)
        weights[q] = w.T if q.endswith("/kernel") else w
    return llama_from_weights(config, weights, dtype=dtype), config


def hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    """The ``config.json`` contents of ``config`` for ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def save_hf(model: Llama, config: LlamaConfig, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` as ``directory/config.json`` and ``directory/model.safetensors`` (float32,
    HF names and (out, in) layout); returns the directory. Inverse of :func:`load_hf`. A model with
    online rotations (``down_hadamard``, ``qk_hadamard``) is refused: Hugging Face's Llama has none."""
    online = [name for name in ("down_hadamard", "qk_hadamard") if getattr(config, name)]
    if online:
        raise ValueError(
            f"config has online rotations {online} that a Hugging Face Llama lacks; save the model "
            "before qjax.methods.rotate_llama"
        )
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = model_weights(model)
    tensors = {}
    for hf, q in _hf_names(config).items():
        w = weights[q]
        tensors[hf] = np.ascontiguousarray(w.T if q.endswith("/kernel") else w)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
    return directory
