"""From block scores to the compact selection, under one budget rule (docs/spec.md section 6).

Every selector ends here, so a comparison between selectors is like for like:
same budget, same forced blocks, same tie handling. The rules: a fixed number of
blocks (``sparsity``), the fewest blocks reaching a cumulative mass (``tau``), the
blocks within a margin of the row's peak in log mass (``peak_margin``, as the
anchor-relative selection of FlashPrefill and AnchorAttention), or every block.
Forced blocks (sink, local window) compose with each: they come first in the
order and are always kept.

Under a causal or block-causal mask (``config.mask``) the candidates of a query
block are the key blocks the mask lets some of its queries see; a block pair the
mask hides is never kept, whatever score a selector gave it. The sparsity budget
is then a fraction of each row's candidates, ``ceil((1 - sparsity) * n_valid)``,
and a token-causal mask always keeps the key blocks on the diagonal (so that
every query sees at least its own key).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

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
    Causal: the key blocks on the diagonal, i.e. those the mask cuts.
    """
    causal = config.mask.kind == "causal"
    if not config.force_sink and not config.local_window and not causal:
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
    if causal:
        allowed, whole = config.mask.block_pairs(length_q, length_k, bq, bk)
        forced = forced | jnp.asarray(allowed & ~whole)[None, None]
    return forced


def allowed_blocks(config: BAConfig, num_q_blocks: int, num_k_blocks: int, length_q: int | None = None,
                   length_k: int | None = None) -> np.ndarray | None:
    """bool [Nq, Nk]: block pairs ``config.mask`` allows (static), or None when it is bidirectional.

    Lengths default to whole blocks.
    """
    if config.mask.is_bidirectional:
        return None
    length_q = num_q_blocks * config.block_q if length_q is None else length_q
    length_k = num_k_blocks * config.block_k if length_k is None else length_k
    return config.mask.block_pairs(length_q, length_k, config.block_q, config.block_k)[0]


def _sparsity_budget(config: BAConfig, num_k_blocks: int) -> np.ndarray:
    """int32 [Nk + 1]: ``ceil((1 - sparsity) * n)`` for n candidate blocks, rounded as ``BAConfig.kmax``."""
    return np.array([math.ceil(round((1.0 - config.sparsity) * n, 9)) for n in range(num_k_blocks + 1)], np.int32)


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


def _within_peak(scores: jax.Array, valid: jax.Array, probs: jax.Array | None, margin: float) -> jax.Array:
    """bool [..., Nk]: valid blocks whose log mass is within ``margin`` of the row's largest.

    Differences of ``scores`` are differences of the log of ``softmax(scores)``, so without
    ``probs`` the scores are compared directly (no underflow); a block of mass 0 is never within.
    """
    log_mass = scores if probs is None else jnp.log(probs.astype(jnp.float32))
    log_mass = jnp.where(valid, log_mass, -jnp.inf)
    peak = jnp.max(log_mass, axis=-1, keepdims=True)
    return (log_mass >= peak - margin) & (log_mass > -jnp.inf)


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
    length_q: int | None = None,
    length_k: int | None = None,
    head_counts: jax.Array | None = None,
    kmax: int | None = None,
) -> BlockSelection:
    """Top blocks of each row of ``scores`` [B, Hq, Nq, Nk] under the config's budget.

    ``scores`` are block logits (``-inf`` marks a key block with nothing to
    attend to; it is never kept, nor is a pair ``config.mask`` hides; the real
    lengths ``length_q`` / ``length_k`` place the mask's edge, default whole
    blocks). Ranking is by score (softmax keeps it);
    forced blocks come first. Under ``tau`` and ``peak_margin`` the mass is
    ``softmax(scores)`` unless the selector passes its own ``probs``.
    ``peak_margin``: a row keeps as many blocks as have ``log mass`` within the
    margin of its largest, plus the forced ones, clamped to
    ``[min_blocks, kmax]``, taken in the ranking's order (for a selector whose
    ranking follows its mass, exactly those blocks).
    ``kernel``: under a fixed budget (no ``tau``), pick the kept blocks with the
    Pallas kernel (``baatt.kernels.pallas_triton.topk``; ``interpret`` runs it
    on CPU) instead of XLA's two sorts; None = the kernel where it is enabled
    by default on a GPU.
    ``head_counts``: int [Hq] or [B, Hq], the blocks each row of a head keeps, in place of the
    config's rule (a traced array: one program serves every value); forced blocks are still added.
    ``kmax``: the static width of the lists, default ``config.kmax(Nk)``; with ``head_counts``
    it caps them, so give at least their largest value.
    """
    b, h, nq, nk = scores.shape
    kmax = config.kmax(nk) if kmax is None else max(1, min(kmax, nk))
    # The kept ids are discrete: no gradient flows through them (and the top-k kernel has no JVP rule).
    scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
    probs = None if probs is None else jax.lax.stop_gradient(probs)
    allowed = allowed_blocks(config, nq, nk, length_q, length_k)
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
        probs = None if probs is None else jnp.where(allowed, probs, 0.0)
    valid = scores > -jnp.inf
    n_valid = jnp.sum(valid, axis=-1)
    priority = jnp.where(valid, scores, -jnp.inf)
    if forced is not None:
        forced = jnp.broadcast_to(forced, scores.shape) & valid
        priority = jnp.where(forced, _FORCED_BONUS, priority)
    if head_counts is not None:
        per_head = jnp.asarray(head_counts, jnp.int32)
        per_head = per_head[None] if per_head.ndim == 1 else per_head  # [1 or B, Hq]
        count = jnp.broadcast_to(per_head[:, :, None], (b, h, nq))
        if forced is not None:
            count = jnp.maximum(count, jnp.sum(forced, axis=-1))
    elif config.tau is not None:
        _, top_idx = jax.lax.top_k(priority, kmax)
        mass = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1) if probs is None else probs
        mass = mass / jnp.maximum(jnp.sum(mass, axis=-1, keepdims=True), 1e-30)
        cum = jnp.cumsum(jnp.take_along_axis(mass, top_idx, axis=-1), axis=-1)
        # Fewest blocks whose mass reaches tau; the float slack keeps tau = 1 reachable.
        count = jnp.sum(cum < config.tau - 1e-6, axis=-1) + 1
        count = jnp.clip(count, config.min_blocks, kmax)
        if forced is not None:
            count = jnp.maximum(count, jnp.sum(forced, axis=-1))
    elif config.peak_margin is not None:
        kept = _within_peak(scores, valid, probs, config.peak_margin)
        if forced is not None:
            kept = kept | forced
        count = jnp.clip(jnp.sum(kept, axis=-1), config.min_blocks, kmax)
    elif allowed is not None and config.sparsity is not None:
        count = jnp.take(jnp.asarray(_sparsity_budget(config, nk)), n_valid)
        if forced is not None:
            count = jnp.maximum(count, jnp.sum(forced, axis=-1))
    else:
        count = jnp.full((b, h, nq), kmax)
    count = jnp.minimum(jnp.minimum(count, n_valid), kmax).astype(jnp.int32)
    count = jnp.maximum(count, 1)  # only reachable for an all-empty row (all keys masked)
    if config.tau is not None and head_counts is None:
        indices = _ascending_kept(top_idx, count, nk)
    elif kernel if kernel is not None else _use_top_blocks_kernel(nk, kmax):
        indices = topk.top_blocks(priority, count, kmax=kmax, interpret=interpret)
    else:
        indices = top_blocks_reference(priority, count, kmax)
    return BlockSelection(indices, count, q_perm, k_perm, config.block_q, config.block_k, mask=config.mask)
