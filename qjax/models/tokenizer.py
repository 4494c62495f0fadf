"""Byte-level BPE tokenizers (``tokenizers`` package) from GGUF metadata or a ``tokenizer.json``.

A GGUF file with ``tokenizer.ggml.model = "gpt2"`` carries a byte-level BPE vocabulary: the tokens
(``tokenizer.ggml.tokens``, id = position), the merges in priority order (``tokenizer.ggml.merges``,
``"a b"`` strings) and each token's type (``tokenizer.ggml.token_type``: 1 normal, 3 control,
4 user-defined). The pre-tokenizer is not stored, only named (``tokenizer.ggml.pre``); the names
supported here map to the Hugging Face pre-tokenizers of the original ``tokenizer.json``:

- ``smollm`` (SmolLM, SmolLM2): ``Sequence[Digits(individual_digits=True),
  ByteLevel(add_prefix_space=False, use_regex=True)]``: every digit is its own pre-token, then
  GPT-2's regex split and byte-to-unicode mapping.
- ``gpt-2`` / ``default``: ``ByteLevel(add_prefix_space=False, use_regex=True)``.

No BOS or EOS token is added when encoding (the perplexity protocol encodes raw text); control
tokens (``<|im_start|>`` ...) are registered as special tokens, so they are matched whole in text and
skipped by ``decode(..., skip_special_tokens=True)``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_CONTROL, _USER_DEFINED = 3, 4
_PRE_TOKENIZERS = ("smollm", "gpt-2", "default")


def _pre_tokenizer(name: str) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the byte-level BPE tokenizer described by GGUF
    ``metadata`` (as returned by :func:`qjax.models.gguf_loader.load_gguf`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE ('gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: {list(_PRE_TOKENIZERS)} "
            "(add its Hugging Face pre-tokenizer to qjax.models.tokenizer._pre_tokenizer)"
        )
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in metadata:
            raise KeyError(f"GGUF metadata has no {key!r}; the file carries no BPE tokenizer")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    specials = [
        AddedToken(tok, special=ty == _CONTROL, normalized=False)
        for tok, ty in zip(tokens, types, strict=True)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tokenizer.add_tokens(specials)
    return tokenizer


def tokenizer_from_file(path: str | os.PathLike[str]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a Hugging Face ``tokenizer.json`` (or a folder holding one).
    Encode with ``add_special_tokens=False`` for raw text without BOS."""
    from pathlib import Path

    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"path={str(path)!r} is not a tokenizer.json (nor a folder with one)")
    return Tokenizer.from_file(str(p))
