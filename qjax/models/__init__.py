"""Pretrained language models for quantization experiments: a Llama-family decoder, loaders for
GGUF and Hugging Face safetensors, the tokenizer, and the perplexity protocol."""

from __future__ import annotations

from qjax.models.gguf_loader import default_gguf_path, load_gguf
from qjax.models.hf_loader import load_hf, save_hf
from qjax.models.llama import (
    SMOLLM2_135M,
    BlockGroups,
    KVCacheQuant,
    LinearPair,
    Llama,
    LlamaConfig,
    NormGroup,
    RMSNorm,
    block_forward,
    llama_from_weights,
    model_weights,
    set_kv_cache,
    smoothing_groups,
)
from qjax.models.perplexity import (
    PerplexityConfig,
    PerplexityResult,
    calibration_windows,
    eval_windows,
    evaluate_perplexity,
    pydoc_text,
    tokenize,
)
from qjax.models.tokenizer import tokenizer_from_file, tokenizer_from_gguf

__all__ = [
    "SMOLLM2_135M",
    "BlockGroups",
    "KVCacheQuant",
    "LinearPair",
    "Llama",
    "LlamaConfig",
    "NormGroup",
    "PerplexityConfig",
    "PerplexityResult",
    "RMSNorm",
    "block_forward",
    "calibration_windows",
    "default_gguf_path",
    "eval_windows",
    "evaluate_perplexity",
    "llama_from_weights",
    "load_gguf",
    "load_hf",
    "model_weights",
    "pydoc_text",
    "save_hf",
    "set_kv_cache",
    "smoothing_groups",
    "tokenize",
    "tokenizer_from_file",
    "tokenizer_from_gguf",
]
