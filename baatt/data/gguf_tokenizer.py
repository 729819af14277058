"""The tokenizer stored in a GGUF file's metadata, rebuilt with Hugging Face ``tokenizers``.

Byte-level BPE (``tokenizer.ggml.model`` "gpt2"): the vocabulary is
``tokenizer.ggml.tokens`` (id = position), the merges ``tokenizer.ggml.merges``
("left right", by priority), and ``tokenizer.ggml.token_type`` marks control
tokens (type 3, e.g. ``<|im_start|>``), which are matched whole in the text, as
Hugging Face tokenizers do. The pre-tokenizer is chosen by ``tokenizer.ggml.pre``:
"gpt-2" (the GPT-2 split) or "smollm" (the same, every digit its own piece).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from baatt.data.gguf_file import open_gguf, read_field

# llama.cpp's token types (gguf.TokenType): 3 = control, 4 = user-defined (both are whole-text matches).
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)


def _pre_tokenizer(pre: str, path: Path):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt-2", "default"):
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise NotImplementedError(f"{path}: tokenizer.ggml.pre={pre!r}; supported pre-tokenizers: 'gpt-2', 'smollm'")


class GGUFTokenizer:
    """Byte-level BPE tokenizer of a GGUF file.

    Attributes: vocab_size; bos_id, eos_id (None when the file names none); special_ids
    (control tokens); backend (the ``tokenizers.Tokenizer``).
    """

    def __init__(self, source: str | os.PathLike | gguf.GGUFReader):
        """source: the GGUF file's path, or a ``gguf.GGUFReader`` of it (see ``open_gguf``)."""
        reader, path = open_gguf(source)

        def field(key, *default):
            return read_field(reader, key, path, *default)

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise NotImplementedError(f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') is supported")
        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")

        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre", "default"), path)
        backend.decoder = decoders.ByteLevel()
        whole = [(tok, int(t) == _CONTROL) for tok, t in zip(tokens, types) if int(t) in (_CONTROL, _USER_DEFINED)]
        backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok, special in whole if special])
        backend.add_tokens([AddedToken(tok, special=False, normalized=False) for tok, special in whole if not special])

        self.path = str(path)
        self.backend = backend
        self.vocab_size = len(tokens)
        bos, eos = field("tokenizer.ggml.bos_token_id", None), field("tokenizer.ggml.eos_token_id", None)
        self.bos_id = None if bos is None else int(bos)
        self.eos_id = None if eos is None else int(eos)
        self.special_ids = frozenset(vocab[tok] for tok, special in whole if special)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added; control tokens written in the text are matched whole)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str; got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (control tokens included)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id must be in [0, {self.vocab_size}); got {bad[0]}")
        return self.backend.decode(ids, skip_special_tokens=False)
