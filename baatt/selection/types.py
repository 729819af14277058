"""The compact block selection: the one contract between selectors and kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from baatt import layout
from baatt.attention_mask import BIDIRECTIONAL, AttentionMask


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
      mask: the attention mask it was made under (static); it may only run under that mask.
    """

    indices: jax.Array
    counts: jax.Array
    q_perm: jax.Array | None = None
    k_perm: jax.Array | None = None
    block_q: int = dataclasses.field(default=128, metadata=dict(static=True))
    block_k: int = dataclasses.field(default=128, metadata=dict(static=True))
    mask: AttentionMask = dataclasses.field(default=BIDIRECTIONAL, metadata=dict(static=True))

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
        """Shape checks always; value checks when the arrays are concrete (see ``guarded`` for traced ones).

        The values must satisfy: counts in [1, kmax]; every id (the unused tail too, which a
        kernel may prefetch) in [0, Nk); the first ``counts`` ids of each list strictly
        ascending (no block counted twice); q_perm / k_perm permutations of their positions.
        """
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
        for name, perm, shape in (("q_perm", self.q_perm, (batch, q_heads, length_q)),
                                  ("k_perm", self.k_perm, (batch, kv_heads, length_k))):
            if perm is None:
                continue
            if perm.shape != shape:
                raise ValueError(f"selection.{name} must have shape {shape}; got {perm.shape}")
            if not jnp.issubdtype(perm.dtype, jnp.integer):
                raise ValueError(f"selection.{name} must be an integer array; got {perm.dtype}")
            if not isinstance(perm, jax.core.Tracer) and not np.all(np.sort(np.asarray(perm), axis=-1)
                                                                     == np.arange(shape[-1])):
                raise ValueError(f"selection.{name} must hold a permutation of range({shape[-1]}) in every "
                                 "(batch, head)")
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
        repeated = _unordered_blocks(np, idx, counts)
        if repeated.any():
            b, h, a = (int(i) for i in np.argwhere(repeated)[0])
            raise ValueError(
                "selection.indices must list the kept key blocks of each query block in ascending order, each "
                f"once (its first counts entries); query block {a} (batch {b}, head {h}) lists "
                f"{idx[b, h, a, :counts[b, h, a]].tolist()}"
            )

    def guarded(self, *, length_q: int, length_k: int) -> tuple[BlockSelection, jax.Array]:
        """The rules of ``validate`` in the graph, for a selection whose values are unknown at trace time.

        Returns ``(safe, bad_rows)``. ``safe`` is this selection with ids clipped into
        [0, Nk), counts into [1, kmax] and permutation entries into range, so that no
        kernel reads out of bounds. ``bad_rows`` (bool [B, Lq, Hq], positional) marks the
        query rows whose list broke a rule, or whose head's q_perm / k_perm is not a
        permutation: clipping changed what they attend to and a repeated id counts a
        block twice, so the caller makes those output rows NaN.
        """
        batch, q_heads, nq, _ = self.indices.shape
        nk = -(-length_k // self.block_k)
        bad = (self.counts < 1) | (self.counts > self.kmax) | _unordered_blocks(jnp, self.indices, self.counts)
        live = jnp.arange(self.kmax) < self.counts[..., None]
        bad = bad | jnp.any(live & ((self.indices < 0) | (self.indices >= nk)), axis=-1)
        k_perm = q_perm = None
        if self.k_perm is not None:
            group_bad = jnp.take(~_is_permutation(self.k_perm), layout.head_map(q_heads, self.k_perm.shape[1]), axis=1)
            bad = bad | group_bad[..., None]
            k_perm = jnp.clip(self.k_perm, 0, length_k - 1)
        rows = jnp.repeat(bad, self.block_q, axis=-1)[..., :length_q]  # [B, Hq, Lq] in block-space order
        if self.q_perm is not None:
            q_perm = jnp.clip(self.q_perm, 0, length_q - 1)
            rows = jnp.take_along_axis(rows, layout.invert_permutation(q_perm), axis=-1)
            rows = rows | ~_is_permutation(self.q_perm)[..., None]
        safe = dataclasses.replace(self, indices=jnp.clip(self.indices, 0, nk - 1),
                                   counts=jnp.clip(self.counts, 1, self.kmax), q_perm=q_perm, k_perm=k_perm)
        return safe, jnp.swapaxes(rows, 1, 2)


def _unordered_blocks(xp, indices, counts):
    """bool [B, H, N]: lists whose first ``counts`` ids are not strictly ascending. xp: numpy or jax.numpy."""
    live = xp.arange(indices.shape[-1]) < counts[..., None]
    return xp.any(live[..., 1:] & (indices[..., 1:] <= indices[..., :-1]), axis=-1)


def _is_permutation(perm: jax.Array) -> jax.Array:
    """bool [B, H]: each row of ``perm`` [B, H, L] holds every position in [0, L) once."""
    batch, heads, length = perm.shape
    b_idx, h_idx = jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, :, None]
    # Negative entries would wrap around as indices: send them past the end, where they are dropped.
    slots = jnp.where(perm < 0, length, perm)
    hits = jnp.zeros(perm.shape, jnp.int32).at[b_idx, h_idx, slots].add(1, mode="drop")
    return jnp.all(hits == 1, axis=-1)
