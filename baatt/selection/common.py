"""Pieces every selector shares: block space, valid key blocks, the final budget step, block maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.config import BAConfig
from baatt.selection.budget import allowed_blocks, forced_blocks, select_from_scores
from baatt.selection.types import BlockSelection


def key_block_counts(kv_valid: jax.Array, block_k: int, q_heads: int) -> jax.Array:
    """Valid keys per key block, broadcast to query heads: [B, Hq, Nk] float32."""
    counts = jnp.sum(layout.block_view(kv_valid, block_k), axis=-1).astype(jnp.float32)
    return jnp.take(counts, layout.head_map(q_heads, kv_valid.shape[1]), axis=1)


def mask_empty(scores: jax.Array, kcount: jax.Array) -> jax.Array:
    """-inf for key blocks with no valid key (they must never be kept)."""
    return jnp.where(kcount[:, :, None, :] > 0, scores, -jnp.inf)


def mask_hidden(scores: jax.Array, q, k, config: BAConfig) -> jax.Array:
    """-inf for the block pairs ``config.mask`` hides (no query of the block may see a key of the other)."""
    allowed = allowed_blocks(config, scores.shape[-2], scores.shape[-1], q.shape[1], k.shape[1])
    return scores if allowed is None else jnp.where(allowed, scores, -jnp.inf)


def finish(
    scores: jax.Array, q, k, config: BAConfig, *, q_perm=None, k_perm=None, probs=None
) -> BlockSelection:
    """Apply forced blocks and the budget rule to ``scores`` [B, Hq, Nq, Nk] (under ``config.mask``)."""
    forced = forced_blocks(
        config, length_q=q.shape[1], length_k=k.shape[1], k_perm=k_perm, q_heads=q.shape[2]
    )
    return select_from_scores(scores, config, forced=forced, q_perm=q_perm, k_perm=k_perm, probs=probs,
                              length_q=q.shape[1], length_k=k.shape[1])


def positional_space(q, k, config: BAConfig, key_mask=None) -> layout.BlockSpace:
    return layout.to_block_space(q, k, None, block_q=config.block_q, block_k=config.block_k, key_mask=key_mask,
                                 mask=config.mask)


def normalised_rows(mass: jax.Array) -> jax.Array:
    """Block mass [B, Hq, Nq, Nk] (>= 0) as a block map: each row divided by its sum."""
    return mass / jnp.maximum(jnp.sum(mass, axis=-1, keepdims=True), 1e-30)


def uniform_block_map(q, k, config: BAConfig, *, key_mask=None) -> jax.Array:
    """Uniform over the key blocks that hold a valid key (and that ``config.mask`` allows): the block map
    of a selector without scores."""
    space = positional_space(q, k, config, key_mask)
    kcount = key_block_counts(space.kv_valid, config.block_k, q.shape[2])
    flat = jnp.zeros((q.shape[0], q.shape[2], space.num_q_blocks, space.num_k_blocks))
    return jax.nn.softmax(mask_hidden(mask_empty(flat, kcount), q, k, config), axis=-1)
