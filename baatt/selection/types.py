"""The compact block selection: the one contract between selectors and kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """Which key blocks each query block attends to (docs/spec.md section 6).

    Block ids refer to the block space the selection was made in: when
    ``q_perm`` / ``k_perm`` are given, query block ``a`` holds the queries at
    original positions ``q_perm[b, h, a*block_q:(a+1)*block_q]`` (norm-sorted
    order), and likewise key block ``j`` for ``k_perm`` (per key/value head).

    Attributes:
      indices: int32 [B, Hq, Nq, kmax]. Entries at positions >= ``counts`` are
        ignored; they repeat the last kept block id so that a kernel may
        prefetch them without going out of bounds. Kept ids are ascending.
      counts: int32 [B, Hq, Nq], in [1, kmax] for every real query block.
      q_perm: int32 [B, Hq, Lq] or None (positional order).
      k_perm: int32 [B, Hkv, Lk] or None (positional order).
      block_q, block_k: block sizes (static).
    """

    indices: jax.Array
    counts: jax.Array
    q_perm: jax.Array | None = None
    k_perm: jax.Array | None = None
    block_q: int = dataclasses.field(default=128, metadata=dict(static=True))
    block_k: int = dataclasses.field(default=128, metadata=dict(static=True))

    @property
    def kmax(self) -> int:
        return self.indices.shape[-1]

    def density(self, num_k_blocks: int) -> jax.Array:
        """Fraction of (query block, key block) pairs computed, per [B, Hq]."""
        return jnp.mean(self.counts.astype(jnp.float32), axis=-1) / num_k_blocks

    def kept_mask(self, num_k_blocks: int) -> jax.Array:
        """bool [B, Hq, Nq, Nk]: the selection as a block mask (for metrics; small)."""
        pos = jnp.arange(self.kmax)
        live = pos < self.counts[..., None]
        onehot = jax.nn.one_hot(self.indices, num_k_blocks, dtype=jnp.bool_)
        return jnp.any(onehot & live[..., None], axis=-2)

    def validate(self, *, batch: int, q_heads: int, kv_heads: int, length_q: int, length_k: int) -> None:
        """Shape checks always; value checks (empty rows, ids out of range) when concrete."""
        nq = -(-length_q // self.block_q)
        nk = -(-length_k // self.block_k)
        if self.indices.ndim != 4 or self.indices.shape[:3] != (batch, q_heads, nq):
            raise ValueError(
                f"selection.indices must have shape [B, Hq, Nq, kmax] = [{batch}, {q_heads}, {nq}, kmax]; "
                f"got {self.indices.shape}"
            )
        if self.counts.shape != (batch, q_heads, nq):
            raise ValueError(f"selection.counts must have shape {(batch, q_heads, nq)}; got {self.counts.shape}")
        if not jnp.issubdtype(self.indices.dtype, jnp.integer) or not jnp.issubdtype(self.counts.dtype, jnp.integer):
            raise ValueError(
                f"selection.indices and counts must be integer arrays; got {self.indices.dtype}, {self.counts.dtype}"
            )
        if self.q_perm is not None and self.q_perm.shape != (batch, q_heads, length_q):
            raise ValueError(f"selection.q_perm must have shape {(batch, q_heads, length_q)}; got {self.q_perm.shape}")
        if self.k_perm is not None and self.k_perm.shape != (batch, kv_heads, length_k):
            raise ValueError(f"selection.k_perm must have shape {(batch, kv_heads, length_k)}; got {self.k_perm.shape}")
        if isinstance(self.counts, jax.core.Tracer) or isinstance(self.indices, jax.core.Tracer):
            return
        counts = np.asarray(self.counts)
        if counts.size and counts.min() < 1:
            raise ValueError(
                "selection.counts must be >= 1 for every query block: an empty selection leaves "
                "queries with nothing to attend to"
            )
        if counts.size and counts.max() > self.kmax:
            raise ValueError(f"selection.counts must be <= kmax={self.kmax}; got max {counts.max()}")
        idx = np.asarray(self.indices)
        if idx.size and (idx.min() < 0 or idx.max() >= nk):
            raise ValueError(f"selection.indices must lie in [0, {nk}); got range [{idx.min()}, {idx.max()}]")
