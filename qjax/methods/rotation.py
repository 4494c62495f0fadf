"""Hadamard rotations of a Llama (QuaRot, Ashkboos et al. 2024): an orthogonal change of basis of
the residual stream and of a few internal activations that spreads activation outliers over all
channels while leaving the float model's function unchanged, before quantizing weights and
activations (W4A4).

With row vectors (``y = x @ W``, kernels (in, out)) and :math:`Q` orthogonal (d, d):

1. **Fuse the norm gains** (:func:`fuse_norms`): an RMSNorm gain :math:`g` moves into the linears
   that read the norm, :math:`W \\leftarrow \\operatorname{diag}(g) W` for ``attn_norm -> q, k, v``
   and ``mlp_norm -> gate, up``, and :math:`g \\leftarrow 1`; the final norm's gain moves into the
   LM head, which becomes its own matrix :math:`\\operatorname{diag}(g) E^\\top` (untied). A norm
   without gain commutes with :math:`Q`: :math:`\\mathrm{rms}(xQ) = \\mathrm{rms}(x)`.
2. **Rotate the residual stream** (:func:`rotate_weights`): :math:`E \\leftarrow E Q`; every linear
   reading the stream (q, k, v, gate, up, LM head) :math:`W \\leftarrow Q^\\top W`; every linear
   writing it (o, down) :math:`W \\leftarrow W Q`. Every block's input is then :math:`hQ`.
3. **Online Hadamard before down_proj** (``online_down``): the MLP computes
   :math:`\\mathrm{down}(z \\bar H)` with :math:`\\bar H = H_n / \\sqrt{n}` (``n = hidden_dim``;
   :attr:`~qjax.models.llama.LlamaConfig.down_hadamard`) and
   :math:`W_{down} \\leftarrow \\bar H^\\top W_{down}`, so ``down_proj``'s activation quantizer sees
   :math:`z \\bar H`.
4. **Query, key and value heads** (``rotate_qk``): queries and keys are multiplied per head by
   :math:`\\bar H_h = H_{d_h} / \\sqrt{d_h}` after the rotary embedding
   (:attr:`~qjax.models.llama.LlamaConfig.qk_hadamard`; the scores are unchanged, and a quantized
   KV cache stores rotated keys); values through the weights,
   :math:`W_v \\leftarrow W_v (I_{H_{kv}} \\otimes \\bar H_h)` and
   :math:`W_o \\leftarrow (I_H \\otimes \\bar H_h^\\top) W_o` (query head :math:`h` reads value head
   :math:`\\lfloor h / G \\rfloor`, rotated by the same :math:`\\bar H_h`).

:func:`rotate_llama` does all of it with :math:`Q` = :func:`qjax.numerics.random_hadamard`
``(dim, seed)``, in float64, and returns a new model; quantize it afterwards (RTN, GPTQ, AWQ,
SmoothQuant on the norm groups). The untied ``lm_head`` is a (dim, vocab) linear like any other to
:func:`qjax.nn.quantize_model`: to keep it float like the embedding, put a rule without specs
first, ``Rule(path="embed|lm_head")``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qjax.models.llama import Llama, LlamaConfig, llama_from_weights, model_weights
from qjax.nn import quantized_ops
from qjax.numerics.hadamard import hadamard, hadamard_factors, random_hadamard

Weights = dict[str, np.ndarray]
_READERS = {
    "attn_norm": ("attn/q_proj", "attn/k_proj", "attn/v_proj"),
    "mlp_norm": ("mlp/gate_proj", "mlp/up_proj"),
}


def _kernel(block: str, linear: str) -> str:
    return f"layers/{block}/{linear}/kernel"


def fuse_norms(config: LlamaConfig, weights: Weights) -> tuple[LlamaConfig, Weights]:
    """Step 1 of the module docstring on float64 copies of ``weights`` (paths as
    :func:`~qjax.models.llama.model_weights`): every RMSNorm gain is 1 and the LM head is untied
    (``lm_head/kernel`` (dim, vocab)). Returns the untied config and the new weights."""
    out = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    for i in range(config.n_layers):
        for norm, readers in _READERS.items():
            g = out[f"layers/{i}/{norm}/weight"]
            for linear in readers:
                out[_kernel(str(i), linear)] = g[:, None] * out[_kernel(str(i), linear)]
            out[f"layers/{i}/{norm}/weight"] = np.ones_like(g)
    head = out["embed/embedding"].T if config.tie_embeddings else out["lm_head/kernel"]
    out["lm_head/kernel"] = out["norm/weight"][:, None] * head
    out["norm/weight"] = np.ones_like(out["norm/weight"])
    return dataclasses.replace(config, tie_embeddings=False), out


def _normalized_hadamard(n: int) -> np.ndarray:
    return hadamard(n) / math.sqrt(n)


def rotate_weights(
    config: LlamaConfig, weights: Weights, q: np.ndarray, *, online_down: bool, rotate_qk: bool
) -> tuple[LlamaConfig, Weights]:
    """Steps 2-4 of the module docstring on norm-fused, untied ``weights`` (:func:`fuse_norms`) with
    the orthogonal ``q`` (dim, dim); returns the config with the online rotations set and the new
    float64 weights."""
    if config.tie_embeddings or any(np.any(w != 1) for k, w in weights.items() if k.endswith("norm/weight")):
        raise ValueError("rotate_weights needs norm-fused, untied weights: call fuse_norms first")
    if q.shape != (config.dim, config.dim):
        raise ValueError(f"q has shape {q.shape}; the residual stream needs ({config.dim}, {config.dim})")
    out = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    out["embed/embedding"] = out["embed/embedding"] @ q
    out["lm_head/kernel"] = q.T @ out["lm_head/kernel"]
    c = config
    h_down = _normalized_hadamard(c.hidden_dim) if online_down else None
    h_head = _normalized_hadamard(c.head_dim) if rotate_qk else None
    for i in range(c.n_layers):
        b = str(i)
        for readers in _READERS.values():
            for linear in readers:
                out[_kernel(b, linear)] = q.T @ out[_kernel(b, linear)]
        for linear in ("attn/o_proj", "mlp/down_proj"):
            out[_kernel(b, linear)] = out[_kernel(b, linear)] @ q
        if h_down is not None:
            out[_kernel(b, "mlp/down_proj")] = h_down.T @ out[_kernel(b, "mlp/down_proj")]
        if h_head is not None:
            v = out[_kernel(b, "attn/v_proj")].reshape(c.dim, c.n_kv_heads, c.head_dim)
            out[_kernel(b, "attn/v_proj")] = (v @ h_head).reshape(c.dim, -1)
            o = out[_kernel(b, "attn/o_proj")].reshape(c.n_heads, c.head_dim, c.dim)
            out[_kernel(b, "attn/o_proj")] = np.einsum("ji,hjk->hik", h_head, o).reshape(-1, c.dim)
    return dataclasses.replace(config, down_hadamard=online_down, qk_hadamard=rotate_qk), out


def _check_orders(config: LlamaConfig, online_down: bool, rotate_qk: bool) -> None:
    sizes = [("dim", config.dim, True), ("hidden_dim", config.hidden_dim, online_down)]
    sizes.append(("head_dim", config.head_dim, rotate_qk))
    for name, size, needed in sizes:
        if needed:
            try:
                hadamard_factors(size)
            except ValueError as e:
                flag = {"hidden_dim": " or online_down=False", "head_dim": " or rotate_qk=False"}.get(
                    name, ""
                )
                raise ValueError(f"rotate_llama: {name}={size} cannot be rotated{flag}: {e}") from None


def rotate_llama(model: Llama, *, seed: int = 0, online_down: bool = True, rotate_qk: bool = False) -> Llama:
    """A new :class:`~qjax.models.llama.Llama` computing what ``model`` computes (up to float
    rounding), with its norms fused, its residual stream rotated by
    :func:`~qjax.numerics.random_hadamard` ``(dim, seed)``, and the optional online rotations
    (module docstring). ``model`` is left as it is; the new model has the same dtype and KV-cache
    setting, an untied ``lm_head`` and ``config.down_hadamard = online_down``,
    ``config.qk_hadamard = rotate_qk``."""
    if not isinstance(model, Llama):
        raise TypeError(f"rotate_llama rotates a float qjax.models.Llama; got {type(model).__name__}")
    quantized = quantized_ops(model)
    if quantized:
        raise ValueError(
            f"model has {len(quantized)} quantized layers (e.g. {quantized[0][0]!r}): rotate the float "
            "model, then quantize the rotated one"
        )
    c = model.config
    if c.down_hadamard or c.qk_hadamard:
        raise ValueError(
            "model already has online rotations (config.down_hadamard or qk_hadamard): rotate the "
            "unrotated model once"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} must be an int")
    _check_orders(c, online_down, rotate_qk)
    fused_config, fused = fuse_norms(c, model_weights(model))
    config, weights = rotate_weights(
        fused_config, fused, random_hadamard(c.dim, seed), online_down=online_down, rotate_qk=rotate_qk
    )
    rotated = llama_from_weights(config, weights, dtype=model.dtype)
    for old, new in zip(model.layers, rotated.layers, strict=True):
        new.attn.kv_cache = old.attn.kv_cache
    return rotated


__all__ = ["fuse_norms", "rotate_llama", "rotate_weights"]
