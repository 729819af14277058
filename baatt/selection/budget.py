"""From block scores to the compact selection, under one budget rule (docs/spec.md section 6).

Every selector ends here, so a comparison between selectors is like for like:
same budget, same forced blocks, same tie handling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from baatt import platform
from baatt.config import BAConfig
from baatt.kernels.pallas_triton import topk
from baatt.selection.types import BlockSelection

_FORCED_BONUS = 1e30  # above any real score, still finite so ordering stays total


def forced_blocks(
    config: BAConfig, *, length_q: int, length_k: int, k_perm: jax.Array | None, q_heads: int
) -> jax.Array | None:
    """bool [B or 1, Hq, Nq, Nk] of always-kept blocks, or None when none are forced [ours].

    Sink: the key block holding each sink position (after sorting, the sorted
    block that holds it). Local: key blocks within ``local_window`` blocks of
    the block holding each query block's centre position (positional only).
    """
    if not config.force_sink and not config.local_window:
        return None
    nq, nk = config.num_blocks(length_q, length_k)
    bq, bk = config.block_q, config.block_k
    forced = jnp.zeros((1, q_heads, nq, nk), jnp.bool_)
    if config.force_sink:
        positions = jnp.asarray([p for p in sorted(set(config.sink_positions)) if p < length_k], jnp.int32)
        if positions.size:
            if k_perm is None:
                blocks = jnp.broadcast_to(positions // bk, (1, 1, positions.size))
            else:
                # Sorted slot of original position p is inverse[p]; only those are needed.
                slot = jnp.argmax(k_perm[..., None] == positions, axis=-2)  # [B, Hkv, P]
                group = q_heads // k_perm.shape[1]
                blocks = jnp.repeat(slot // bk, group, axis=1)
            hit = jnp.any(jax.nn.one_hot(blocks, nk, dtype=jnp.bool_), axis=-2)  # [B, H, Nk]
            forced = forced | hit[:, :, None, :]
    if config.local_window:
        centre = (jnp.arange(nq) * bq + bq // 2).clip(max=length_k - 1) // bk
        offset = jnp.arange(nk)[None, :] - centre[:, None]
        forced = forced | (jnp.abs(offset) <= config.local_window)[None, None]
    return forced


def _ascending_kept(top_idx: jax.Array, count: jax.Array, num_k_blocks: int) -> jax.Array:
    """The first ``count`` ids of ``top_idx`` (score order) ascending, padded with the last kept id."""
    live = jnp.arange(top_idx.shape[-1]) < count[..., None]
    kept = jnp.sort(jnp.where(live, top_idx, num_k_blocks), axis=-1)
    last = jnp.take_along_axis(kept, (count - 1)[..., None], axis=-1)
    return jnp.where(live, kept, last).astype(jnp.int32)


def top_blocks_reference(priority: jax.Array, count: jax.Array, kmax: int) -> jax.Array:
    """Kept ids [..., kmax]: the ``count`` largest of each row of ``priority`` (ties to the lower id,
    as ``jax.lax.top_k``), ascending, then the last kept id repeated. XLA: two sorts."""
    _, top_idx = jax.lax.top_k(priority, kmax)
    return _ascending_kept(top_idx, count, priority.shape[-1])


def _use_top_blocks_kernel(num_k_blocks: int, kmax: int) -> bool:
    return topk.DEFAULT_ON_GPU and topk.unsupported_reason(num_k_blocks, kmax) is None and platform.has_gpu()


def select_from_scores(
    scores: jax.Array,
    config: BAConfig,
    *,
    forced: jax.Array | None = None,
    q_perm: jax.Array | None = None,
    k_perm: jax.Array | None = None,
    probs: jax.Array | None = None,
    kernel: bool | None = None,
    interpret: bool = False,
) -> BlockSelection:
    """Top blocks of each row of ``scores`` [B, Hq, Nq, Nk] under the config's budget.

    ``scores`` are block logits (``-inf`` marks a key block with nothing to
    attend to; it is never kept). Ranking is by score (softmax keeps it);
    forced blocks come first. Under ``tau`` the cumulative mass uses
    ``softmax(scores)`` unless the selector passes its own ``probs``.
    ``kernel``: under a fixed budget (no ``tau``), pick the kept blocks with the
    Pallas kernel (``baatt.kernels.pallas_triton.topk``; ``interpret`` runs it
    on CPU) instead of XLA's two sorts; None = the kernel where it is enabled
    by default on a GPU.
    """
    b, h, nq, nk = scores.shape
    kmax = config.kmax(nk)
    # The kept ids are discrete: no gradient flows through them (and the top-k kernel has no JVP rule).
    scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
    probs = None if probs is None else jax.lax.stop_gradient(probs)
    valid = scores > -jnp.inf
    n_valid = jnp.sum(valid, axis=-1)
    priority = jnp.where(valid, scores, -jnp.inf)
    if forced is not None:
        forced = jnp.broadcast_to(forced, scores.shape) & valid
        priority = jnp.where(forced, _FORCED_BONUS, priority)
    if config.tau is not None:
        _, top_idx = jax.lax.top_k(priority, kmax)
        mass = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1) if probs is None else probs
        mass = mass / jnp.maximum(jnp.sum(mass, axis=-1, keepdims=True), 1e-30)
        cum = jnp.cumsum(jnp.take_along_axis(mass, top_idx, axis=-1), axis=-1)
        # Fewest blocks whose mass reaches tau; the float slack keeps tau = 1 reachable.
        count = jnp.sum(cum < config.tau - 1e-6, axis=-1) + 1
        count = jnp.clip(count, config.min_blocks, kmax)
        if forced is not None:
            count = jnp.maximum(count, jnp.sum(forced, axis=-1))
    else:
        count = jnp.full((b, h, nq), kmax)
    count = jnp.minimum(jnp.minimum(count, n_valid), kmax).astype(jnp.int32)
    count = jnp.maximum(count, 1)  # only reachable for an all-empty row (all keys masked)
    if config.tau is not None:
        indices = _ascending_kept(top_idx, count, nk)
    elif kernel if kernel is not None else _use_top_blocks_kernel(nk, kmax):
        indices = topk.top_blocks(priority, count, kmax=kmax, interpret=interpret)
    else:
        indices = top_blocks_reference(priority, count, kmax)
    return BlockSelection(indices, count, q_perm, k_perm, config.block_q, config.block_k)
