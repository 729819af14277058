"""Who attends to whom: bidirectional, causal and block-causal masks, for tokens and for block pairs.

All three masks are one rule on positions: query ``i`` sees key ``j`` when
``j // G <= i // G``, with ``G = 1`` for token-causal attention, ``G`` the
generation block for block-causal attention (block diffusion: a query sees
every key of its own generation block and of the earlier ones) and no rule at
all for bidirectional attention. Equivalently ``j < key_limit(i)`` with
``key_limit(i) = (i // G + 1) * G``. Positions count from 0 in both sequences:
with ``Lq != Lk`` the mask is aligned at the top left, as
``jax.nn.dot_product_attention(..., is_causal=True)`` aligns it (query ``i``
sees keys ``j <= i``).

This module imports nothing from baatt: ``BAConfig``, ``BlockSelection`` and the
block layout all carry an ``AttentionMask`` as static metadata.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MASK_KINDS = ("bidirectional", "causal", "block_causal")


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """A positional attention mask (hashable: a static argument of ``jax.jit``).

    Attributes:
      kind: "bidirectional" (every query sees every key), "causal" (query ``i``
        sees keys ``j <= i``) or "block_causal" (query ``i`` sees keys ``j`` with
        ``j // generation_block <= i // generation_block``).
      generation_block: the block of tokens generated together, for "block_causal"
        only (None otherwise).
    """

    kind: str = "bidirectional"
    generation_block: int | None = None

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"AttentionMask.kind must be one of {MASK_KINDS}; got {self.kind!r}")
        g = self.generation_block
        if self.kind == "block_causal":
            if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                raise ValueError(f"AttentionMask.generation_block must be a positive int for kind='block_causal'; "
                                 f"got {g!r}")
        elif g is not None:
            raise ValueError(f"AttentionMask.generation_block applies to kind='block_causal' only (must be None for "
                             f"{self.kind!r}); got {g!r}")

    @classmethod
    def causal(cls) -> AttentionMask:
        return cls("causal")

    @classmethod
    def block_causal(cls, generation_block: int) -> AttentionMask:
        return cls("block_causal", generation_block)

    @property
    def is_bidirectional(self) -> bool:
        return self.kind == "bidirectional"

    @property
    def span(self) -> int | None:
        """``G`` of the rule ``j // G <= i // G``: None (bidirectional), 1 (causal) or the generation block."""
        return {"bidirectional": None, "causal": 1}.get(self.kind, self.generation_block)

    def describe(self) -> str:
        return self.kind if self.generation_block is None else f"{self.kind} (generation_block={self.generation_block})"

    def key_limit(self, q_pos):
        """First key position that query position ``q_pos`` may not see (ints or integer arrays).

        Bidirectional masks have no limit: call this only on causal ones.
        """
        g = self.span
        if g is None:
            raise ValueError("a bidirectional mask has no key limit")
        return (q_pos // g + 1) * g

    def block_size_rule(self, block_q: int, block_k: int) -> str | None:
        """Why these attention block sizes cannot run under this mask, or None.

        A block-causal mask needs ``generation_block`` to be a multiple of both block sizes, so that
        every block pair lies wholly inside or wholly outside the mask.
        """
        g = self.generation_block
        if self.kind == "block_causal" and (g % block_q or g % block_k):
            return (f"generation_block ({g}) must be a multiple of the query and key block sizes "
                    f"({block_q}, {block_k}) under a block_causal mask")
        return None

    def token_mask(self, length_q: int, length_k: int) -> np.ndarray | None:
        """bool [Lq, Lk]: query ``i`` may see key ``j``; None when bidirectional. For references and tests."""
        if self.is_bidirectional:
            return None
        return np.arange(length_k)[None, :] < self.key_limit(np.arange(length_q))[:, None]

    def block_pairs(self, length_q: int, length_k: int, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(allowed, whole), bool [Nq, Nk] (static, from the real lengths).

        allowed: some real query of block ``a`` may see some key of block ``b``; whole: every real
        query of ``a`` may see every key of ``b`` (the pair needs no mask inside). A pair that is
        allowed but not whole crosses the mask's edge (the diagonal, for a causal mask).
        """
        nq, nk = -(-length_q // block_q), -(-length_k // block_k)
        if self.is_bidirectional:
            every = np.ones((nq, nk), bool)
            return every, every
        first_q = np.arange(nq) * block_q
        last_q = np.minimum(first_q + block_q, length_q) - 1
        first_k = np.arange(nk) * block_k
        end_k = np.minimum(first_k + block_k, length_k)
        allowed = first_k[None, :] < self.key_limit(last_q)[:, None]
        whole = end_k[None, :] <= self.key_limit(first_q)[:, None]
        return allowed, whole

    def visible_keys(self, length_q: int, length_k: int) -> np.ndarray | None:
        """bool [Lk]: keys some query may see (None when every key is). Keys past the last query's limit
        (``Lk > Lq`` under a causal mask) are seen by no query and are treated as padding."""
        if self.is_bidirectional or self.key_limit(length_q - 1) >= length_k:
            return None
        return np.arange(length_k) < self.key_limit(length_q - 1)


BIDIRECTIONAL = AttentionMask()
CAUSAL = AttentionMask.causal()


def resolve_mask(is_causal: bool = False, mask: AttentionMask | None = None) -> AttentionMask:
    """The one mask meant by ``is_causal`` (``jax.nn``'s shorthand for a causal mask) and ``mask``."""
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool; got {is_causal!r}")
    if mask is not None and not isinstance(mask, AttentionMask):
        raise ValueError(f"mask must be a baatt.AttentionMask or None; got {type(mask).__name__}")
    if is_causal and mask is not None and mask != CAUSAL:
        raise ValueError(f"is_causal=True asks for a causal mask but mask is {mask.describe()}: give one of them")
    return CAUSAL if is_causal else (BIDIRECTIONAL if mask is None else mask)


def with_is_causal(config, is_causal: bool):
    """``config`` (a ``BAConfig``) under a token-causal mask when ``is_causal`` (``jax.nn``'s keyword).

    ``is_causal=True`` with a config that already holds another causal mask (block-causal) is refused
    rather than resolved one way or the other.
    """
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool; got {is_causal!r}")
    if not is_causal or config.mask == CAUSAL:
        return config
    if not config.mask.is_bidirectional:
        raise ValueError(f"is_causal=True asks for a token-causal mask but config.mask is "
                         f"{config.mask.describe()}: give one of them")
    return config.replace(mask=CAUSAL)
