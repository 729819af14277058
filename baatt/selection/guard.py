"""Accuracy guard: an online check of a selection against exact attention, per head.

A selector is an estimate; on some inputs (a needle key that mean pooling averages away) it
misses where the mass is, and nothing downstream notices. The guard measures it: per
(batch, head), one query block is drawn, its exact softmax over every key it may see is
computed, and the share of that mass inside the key blocks the selection keeps for it is the
head's recall estimate. A head whose estimate falls below ``BAConfig.guard_recall`` attends
to every block instead (every valid, visible key block of every query block of that head),
so the guard trades that head's speed for exactness, and only there.

Cost: one query block's logits against every key, ``2 * block_q * Lk * d`` FLOPs per head,
i.e. ``block_q / (2 * Lq)`` of dense attention's ``4 * Lq * Lk * d`` (``GuardReport.cost``),
plus the densified heads' attention. The sampled block is drawn from ``BAConfig.seed``, so a
run is reproducible; a head passes or fails on that block alone, which is an estimate.

The densified selection has lists as wide as the number of key blocks (a static width, the
same for every head), the lists of the heads that passed padded with their last kept id.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.config import BAConfig
from baatt.selection.types import BlockSelection

HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GuardReport:
    """What the guard measured and did (``AttentionStats.guard``).

    Attributes:
      recall: [B, Hq] float32, the kept share of the sampled query block's exact softmax mass.
      fired: bool [B, Hq], the heads densified (recall below ``threshold``).
      sampled_block: int32 [B, Hq], the query block checked (in the selection's block space).
      threshold: ``BAConfig.guard_recall``.
      cost: the check's FLOPs over dense attention's ``4 * Lq * Lk * d`` (densified heads aside).
    """

    recall: jax.Array
    fired: jax.Array
    sampled_block: jax.Array
    threshold: float = dataclasses.field(metadata=dict(static=True))
    cost: float = dataclasses.field(metadata=dict(static=True))

    @property
    def fire_rate(self) -> jax.Array:
        """Share of (batch, head) pairs densified."""
        return jnp.mean(self.fired.astype(jnp.float32))


def sampled_recall(q, k, selection: BlockSelection, *, key_mask=None, scale: float, seed: int = 0):
    """(recall [B, Hq], sampled_block int32 [B, Hq]): per head, the kept share of one random query
    block's exact softmax mass (averaged over its real queries that see a key)."""
    space = layout.to_block_space(q, k, None, block_q=selection.block_q, block_k=selection.block_k,
                                  key_mask=key_mask, q_perm=selection.q_perm, k_perm=selection.k_perm,
                                  mask=selection.mask)
    b, hq = space.q.shape[:2]
    nk, bq, bk = space.num_k_blocks, space.block_q, space.block_k
    block = jax.random.randint(jax.random.key(seed), (b, hq), 0, -(-q.shape[1] // bq), jnp.int32)
    rows = block[..., None] * bq + jnp.arange(bq)  # [B, Hq, bq] slots in block space
    qa = jnp.take_along_axis(space.q, rows[..., None], axis=2)
    heads = layout.head_map(hq, space.k.shape[1])
    keys, key_ok = jnp.take(space.k, heads, axis=1), jnp.take(space.kv_valid, heads, axis=1)
    logits = jnp.einsum("bhqd,bhkd->bhqk", qa, keys, precision=HIGHEST,
                        preferred_element_type=jnp.float32) * scale
    seen = key_ok[:, :, None, :]
    if not selection.mask.is_bidirectional:  # positional: slots are positions
        limit = selection.mask.key_limit(rows)
        seen = seen & (jnp.arange(keys.shape[2]) < limit[..., None])
    logits = jnp.where(seen, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    live_row = jnp.isfinite(lse[..., 0]) & (rows < q.shape[1])
    probs = jnp.where(jnp.isfinite(lse), jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
    kept_blocks = jnp.take_along_axis(selection.kept_mask(nk), block[..., None, None], axis=2)[:, :, 0]  # [B,Hq,Nk]
    kept_keys = jnp.repeat(kept_blocks, bk, axis=-1)[:, :, None, :]
    share = jnp.sum(jnp.where(kept_keys, probs, 0.0), axis=-1)  # [B, Hq, bq]
    n_live = jnp.sum(live_row, axis=-1)
    recall = jnp.where(n_live > 0, jnp.sum(jnp.where(live_row, share, 0.0), axis=-1) / jnp.maximum(n_live, 1), 1.0)
    return recall, block


def densified(selection: BlockSelection, heads: jax.Array, allowed: jax.Array) -> BlockSelection:
    """``selection`` with every allowed block kept in the heads where ``heads`` (bool [B, Hq]) is True.

    allowed: bool [B, Hq, Nq, Nk], the block pairs a query block may attend to (valid and visible).
    Lists widen to Nk.
    """
    nk = allowed.shape[-1]
    # Allowed ids first, ascending; then the rest, which the count leaves out.
    every = jnp.argsort(~allowed, axis=-1, stable=True).astype(jnp.int32)
    every_count = jnp.maximum(jnp.sum(allowed, axis=-1), 1).astype(jnp.int32)
    last = jnp.take_along_axis(every, (every_count - 1)[..., None], axis=-1)
    every = jnp.where(jnp.arange(nk) < every_count[..., None], every, last)
    tail = jnp.take_along_axis(selection.indices, (selection.counts - 1)[..., None], axis=-1)
    width = nk - selection.kmax
    own = jnp.concatenate([selection.indices, jnp.broadcast_to(tail, tail.shape[:-1] + (width,))], axis=-1)
    fire = heads[..., None, None]
    return dataclasses.replace(selection, indices=jnp.where(fire, every, own),
                               counts=jnp.where(heads[..., None], every_count, selection.counts))


def guard_selection(q, k, selection: BlockSelection, config: BAConfig, *, key_mask=None,
                    scale: float | None = None) -> tuple[BlockSelection, GuardReport]:
    """Check ``selection`` per head on one sampled query block and densify the heads whose recall
    falls below ``config.guard_recall`` (see the module docstring)."""
    if config.guard_recall is None:
        raise ValueError("config.guard_recall must be set (a recall in (0, 1]) to guard a selection")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    recall, block = sampled_recall(q, k, selection, key_mask=key_mask, scale=scale, seed=config.seed)
    fired = recall < config.guard_recall
    space = layout.to_block_space(q[:, :1], k, None, block_q=selection.block_q, block_k=selection.block_k,
                                  key_mask=key_mask, k_perm=selection.k_perm)
    nq = -(-q.shape[1] // selection.block_q)
    nonempty = jnp.any(layout.block_view(space.kv_valid, selection.block_k), axis=-1)  # [B, Hkv, Nk]
    nonempty = jnp.take(nonempty, layout.head_map(q.shape[2], k.shape[2]), axis=1)[:, :, None, :]
    allowed = jnp.broadcast_to(nonempty, nonempty.shape[:2] + (nq, nonempty.shape[-1]))
    if not selection.mask.is_bidirectional:
        pairs, _ = selection.mask.block_pairs(q.shape[1], k.shape[1], selection.block_q, selection.block_k)
        allowed = allowed & jnp.asarray(pairs)
    report = GuardReport(recall, fired, block, threshold=float(config.guard_recall),
                         cost=selection.block_q / (2 * q.shape[1]))
    return densified(selection, fired, allowed), report
