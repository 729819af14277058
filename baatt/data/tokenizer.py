"""GPT-2 byte-level BPE, implemented here from the ``.tiktoken`` ranks file, plus a mask token.

The ranks file (``gpt2.tiktoken``: one ``base64(token bytes) rank`` per line,
identical to tiktoken's r50k_base) is installed by ``bash scripts/setup_data.sh``.
Encoding: split text with the GPT-2 pre-tokenization pattern, then merge the
bytes of each piece greedily by lowest rank (the classic BPE rule; byte-level,
so every string round-trips). Ids: 0..50255 BPE tokens, 50256 ``<|endoftext|>``,
50257 ``<|mask|>`` (ours, for masked diffusion).
"""

from __future__ import annotations

import base64
import functools
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

try:  # the exact GPT-2 pattern needs \p{L} / \p{N}
    import regex as _re

    _PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
except ImportError:  # stdlib fallback: same classes up to rare Unicode number categories
    import re as _re

    _PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""

SETUP_HINT = "run `bash scripts/setup_data.sh` from the repository root to install it"


def data_dir() -> Path:
    """``$BAATT_DATA_DIR`` or ``.data/`` at the repository root."""
    env = os.environ.get("BAATT_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".data"


def default_ranks_path() -> Path:
    return data_dir() / "raw" / "gpt2.tiktoken"


class Tokenizer:
    """GPT-2 BPE with an end-of-text and a mask token.

    Attributes:
      eot_id: 50256; mask_id: 50257; vocab_size: 50258 (ids in use).
    """

    def __init__(self, ranks_path: str | os.PathLike | None = None):
        path = Path(ranks_path) if ranks_path is not None else default_ranks_path()
        self.path = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 BPE ranks file not found at {path}; {SETUP_HINT}")
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        if len(ranks) != 50256 or sorted(ranks.values()) != list(range(50256)):
            raise ValueError(f"{path} is not the GPT-2 ranks file (expected ranks 0..50255); {SETUP_HINT}")
        self._ranks = ranks
        self._decoder = {r: b for b, r in ranks.items()}
        self.eot_id = 50256
        self.mask_id = 50257
        self.vocab_size = 50258
        self._special = {self.eot_id: b"<|endoftext|>", self.mask_id: b"<|mask|>"}
        self._split = _re.compile(_PATTERN)
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- BPE ---------------------------------------------------------------------

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        ranks = self._ranks
        if piece in ranks:
            return (ranks[piece],)
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return tuple(ranks[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens are not parsed: text is text)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str; got {type(text).__name__}")
        out: list[int] = []
        cache = self._cache
        for piece in self._split.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece.encode("utf-8"))
                if len(cache) < 500_000:
                    cache[piece] = ids
            out.extend(ids)
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        chunks = []
        for i in ids:
            i = int(i)
            if i in self._decoder:
                chunks.append(self._decoder[i])
            elif i in self._special:
                chunks.append(self._special[i])
            else:
                raise ValueError(f"token id must be in [0, {self.vocab_size}); got {i}")
        return b"".join(chunks)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), np.int32)


@functools.lru_cache(maxsize=4)
def _cached(path: str) -> Tokenizer:
    return Tokenizer(path)


def get_tokenizer(ranks_path: str | os.PathLike | None = None) -> Tokenizer:
    """A shared tokenizer instance (loading the ranks takes ~0.1 s)."""
    return _cached(str(Path(ranks_path) if ranks_path is not None else default_ranks_path()))
