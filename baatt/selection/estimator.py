"""The BA-Att estimator: norm sorts, block statistics and pooled scores, fused for speed.

docs/spec.md section 2 (pooled logits), section 4 (norm sorting), section 5
(covariance compensation, count correction). Same quantities as
``baatt.reference.pre_downsample_scores``, which states them plainly and which the
tests compare this against; here the statistics take one read of Q and K
(shifted one-pass moments, reductions in the caller's layout when nothing is
sorted) and the sorts take the fast argsort route (``baatt.selection.sorting``).

Under a causal or block-causal ``config.mask`` the scores of the block pairs the
mask hides are ``-inf``. A block-causal mask whose generation block the block
sizes divide cuts no pair; a token-causal one cuts the pairs on the diagonal,
whose score is the mean logit over the (query, key) pairs it allows plus the log
of the keys a query sees there on average (``diagonal_logits``: one small tile
per query block, so no statistic of a future key enters a score).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from baatt import layout
from baatt.config import BAConfig
from baatt.selection.budget import allowed_blocks
from baatt.selection.cluster import balanced_kmeans
from baatt.selection.sorting import norm_sort
from baatt.validation import check_qk

HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockStats:
    """Per-block mean, per-channel (population) variance and valid-token count.

    mean, var: [B, H, N, D] float32 (var None where it was not needed: no compensation);
    count: [B, H, N] float32.
    """

    mean: jax.Array
    var: jax.Array | None
    count: jax.Array


def block_stats(x: jax.Array, valid: jax.Array, block: int, *, with_var: bool = True) -> BlockStats:
    """x [B, H, N*block, D], valid bool [B, H, N*block] (or broadcastable) -> BlockStats.

    Empty blocks get mean 0, var 0, count 0. with_var=False: var is None (one read of x fewer).
    """
    xb = layout.block_view(x.astype(jnp.float32), block)
    vb = layout.block_view(jnp.broadcast_to(valid, x.shape[:3]), block)[..., None]
    mean, var, count = _masked_moments(xb, vb, axis=-2, with_var=with_var)  # count [B, H, N, 1]
    return BlockStats(mean, var, count[..., 0])


def _masked_moments(xb, vb, axis: int, with_var: bool = True):
    """Mean, population variance and count (float32) of xb over ``axis``, counting only where vb is True
    (vb None: everywhere).

    Empty groups give mean 0 and var 0. count keeps ``axis`` out (the shape of the reduction of vb).
    with_var=False: var is None and the mean is one plain sum.
    With the variance, both come from one variadic reduction (one read of xb; a centred second pass
    reads Q and K again, and XLA materialised a float32 copy of them for the two consumers):
    mean = s + E[x - s], var = E[(x - s)^2] - E[x - s]^2, with s each group's first element (0 where
    that one is not valid); the shift keeps the cancellation of E[x^2] - E[x]^2 away when |mean| >> spread.
    """
    ax = axis % xb.ndim
    if vb is None:  # every element valid: no masks to reduce, the shift is each group's first element
        vb = True
        count = jnp.full(xb.shape[:ax] + (1,) * (xb.ndim - ax - 1), xb.shape[ax], jnp.float32)
        shift = lax.slice_in_dim(xb, 0, 1, axis=ax)
    else:
        count = jnp.sum(vb, axis=axis, dtype=jnp.float32)
    denom = jnp.maximum(count, 1.0)
    if not with_var:
        return jnp.sum(jnp.where(vb, xb, 0.0), axis=axis) / denom, None, count
    if vb is not True:
        # Each group's first element when it is valid (padding and sorted-away keys sit at the ends),
        # else 0. A slice rather than a search for the first valid element: that search over a
        # constant mask made XLA constant-fold for seconds.
        first = lambda a: lax.slice_in_dim(a, 0, 1, axis=ax)
        shift = jnp.where(first(vb), first(xb), 0.0)
    dev = jnp.where(vb, xb - shift, 0.0)
    s1, s2 = lax.reduce((dev, dev * dev), (jnp.float32(0), jnp.float32(0)),
                        lambda a, b: (a[0] + b[0], a[1] + b[1]), (ax,))
    s1, s2 = s1 / denom, s2 / denom
    mean = jnp.where(count > 0, jnp.squeeze(shift, axis) + s1, 0.0)
    return mean, jnp.maximum(s2 - s1 * s1, 0.0), count


def block_stats_positional(x: jax.Array, valid: jax.Array | None, block: int, *, with_var: bool = True) -> BlockStats:
    """:func:`block_stats` of x [B, L, H, D] in its own layout; valid bool [B, L] or None (all valid).

    The same statistics as ``block_stats`` on the head-major copy ``to_block_space`` makes, without
    making it: the block reductions read x where it lies and only the [B, N, H, D] results are
    transposed, so unsorted statistics cost one read of x (with the variance too) instead of a
    transposed copy plus those reads. Used when no permutation is applied.
    """
    b, length, h, d = x.shape
    n = -(-length // block)
    pad = n * block - length
    if pad:  # the padding rows are invalid, so a mask is needed even where none was given
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        valid = jnp.ones((b, length), jnp.bool_) if valid is None else valid
        valid = jnp.pad(valid, ((0, 0), (0, pad)), constant_values=False)
    xb = x.reshape(b, n, block, h, d).astype(jnp.float32)
    vb = None if valid is None else valid.reshape(b, n, block)[:, :, :, None, None]
    mean, var, count = _masked_moments(xb, vb, axis=2, with_var=with_var)  # [B, N, H, D], count [B, N, 1, 1]
    heads_major = lambda a: None if a is None else jnp.transpose(a, (0, 2, 1, 3))
    count = jnp.broadcast_to(count.reshape(b, n)[:, None, :], (b, h, n))
    return BlockStats(heads_major(mean), heads_major(var), count)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Estimate:
    """Everything the estimator computed, in (possibly sorted) block space.

    scores: [B, Hq, Nq, Nk] float32 block logits (``-inf`` for key blocks with
    no valid key); q_perm [B, Hq, Lq] / k_perm [B, Hkv, Lk] or None;
    q_stats / k_stats: BlockStats of the blocked Q ([B, Hq, ...]) and K ([B, Hkv, ...]); their var
    is None unless the config compensates.
    """

    scores: jax.Array
    q_perm: jax.Array | None
    k_perm: jax.Array | None
    q_stats: BlockStats
    k_stats: BlockStats


def sort_permutations(q, k, config: BAConfig, key_mask=None):
    """(q_perm, k_perm), each None when neither sorting (docs/spec.md section 4) nor clustering
    (``baatt.selection.cluster``) orders that side."""
    q_perm = k_perm = None
    if config.sort_q:
        q_perm = norm_sort(q)[0]
    elif config.cluster_q:
        q_perm = balanced_kmeans(q, config.block_q, iters=config.cluster_iters)
    if config.sort_k:
        k_perm = norm_sort(k, mask=key_mask)[0]
    elif config.cluster_k:
        k_perm = balanced_kmeans(k, config.block_k, iters=config.cluster_iters, mask=key_mask)
    return q_perm, k_perm


def ordered_space(q, k, config: BAConfig, key_mask=None) -> tuple[layout.BlockSpace, jax.Array | None, jax.Array | None]:
    """(space, q_perm, k_perm): Q and K in the block space of ``config`` (positional, norm-sorted or
    clustered, under its mask) and the permutations a selection made there carries."""
    q_perm, k_perm = sort_permutations(q, k, config, key_mask)
    space = layout.to_block_space(q, k, None, block_q=config.block_q, block_k=config.block_k, key_mask=key_mask,
                                  q_perm=q_perm, k_perm=k_perm, mask=config.mask)
    return space, q_perm, k_perm


def pooled_scores(q_stats: BlockStats, k_stats: BlockStats, config: BAConfig, head_dim: int) -> jax.Array:
    """Block logits from pooled statistics, [B, Hq, Nq, Nk].

    l_bar = Qbar.Kbar / sqrt(d)                                   (docs/spec.md section 2)
    Delta = (1/d) sum_t VarQ Kbar^2 + VarK Qbar^2 + VarQ VarK     (docs/spec.md section 5)
    score = l_bar + beta * Delta [+ log(valid keys)]              (count term: [ours])
    """
    hq, hkv = q_stats.mean.shape[1], k_stats.mean.shape[1]
    hm = layout.head_map(hq, hkv)
    km, kc = (jnp.take(a, hm, axis=1) for a in (k_stats.mean, k_stats.count))
    qm = q_stats.mean
    if config.compensate:
        # One contraction over [Qbar/sqrt(d), c VarQ, c Qbar^2] . [Kbar, Kbar^2 + VarK, VarK], c = beta/d:
        # l_bar + beta*Delta without four [Nq, Nk] products summed afterwards.
        qv, kv = q_stats.var, jnp.take(k_stats.var, hm, axis=1)
        c = config.beta / head_dim
        qcat = jnp.concatenate([qm / math.sqrt(head_dim), c * qv, c * qm * qm], axis=-1)
        kcat = jnp.concatenate([km, km * km + kv, kv], axis=-1)
        scores = jnp.einsum("bhad,bhnd->bhan", qcat, kcat, precision=HIGHEST)
    else:
        scores = jnp.einsum("bhad,bhnd->bhan", qm, km, precision=HIGHEST) / math.sqrt(head_dim)
    if config.count_correction:
        scores = scores + jnp.log(jnp.maximum(kc, 1.0))[:, :, None, :]
    return jnp.where(kc[:, :, None, :] > 0, scores, -jnp.inf)


def estimate(q, k, config: BAConfig, *, key_mask=None) -> Estimate:
    """Sort (optional), pool, score. The whole BA-Att estimator in one function."""
    check_qk(q, k, key_mask=key_mask)
    return _estimate_jit(q, k, key_mask, config)


@functools.partial(jax.jit, static_argnums=(3,))
def _estimate_jit(q, k, key_mask, config):
    q_perm, k_perm = sort_permutations(q, k, config, key_mask)
    if q_perm is None:
        q_stats = block_stats_positional(q, None, config.block_q, with_var=config.compensate)
    if k_perm is None:
        k_stats = block_stats_positional(k, key_mask, config.block_k, with_var=config.compensate)
    if q_perm is not None or k_perm is not None:
        space = layout.to_block_space(
            q, k, None, block_q=config.block_q, block_k=config.block_k,
            key_mask=key_mask, q_perm=q_perm, k_perm=k_perm,
        )
        if q_perm is not None:
            q_stats = block_stats(space.q, space.q_valid[:, None, :], config.block_q, with_var=config.compensate)
        if k_perm is not None:
            k_stats = block_stats(space.k, space.kv_valid, config.block_k, with_var=config.compensate)
    scores = pooled_scores(q_stats, k_stats, config, q.shape[-1])
    k_count = jnp.take(k_stats.count, layout.head_map(q.shape[2], k.shape[2]), axis=1)
    scores = apply_mask(scores, k_count, q, k, key_mask, config)
    return Estimate(scores, q_perm, k_perm, q_stats, k_stats)


def apply_mask(scores: jax.Array, k_count: jax.Array, q, k, key_mask, config: BAConfig) -> jax.Array:
    """Block scores [B, Hq, Nq, Nk] under ``config.mask``: ``-inf`` where it hides the pair; on the
    diagonal of a token-causal mask, where some real query may not see some valid key, the masked mean
    logit (+ the log of the mean count of keys seen, with ``count_correction``) instead of the pooled
    score. k_count: valid keys per key block, [B, Hq, Nk]."""
    allowed = allowed_blocks(config, scores.shape[-2], scores.shape[-1], q.shape[1], k.shape[1])
    if allowed is None:
        return scores
    scores = jnp.where(allowed, scores, -jnp.inf)
    if config.mask.kind != "causal":
        return scores
    mean_logit, seen = diagonal_logits(q, k, key_mask, config)
    cut = mean_logit + (jnp.log(jnp.maximum(seen, 1e-30)) if config.count_correction else 0.0)
    _, whole = config.mask.block_pairs(q.shape[1], k.shape[1], config.block_q, config.block_k)
    whole = whole | (seen >= k_count[:, :, None, :])
    return jnp.where(whole, scores, jnp.where(seen > 0, cut, -jnp.inf))


# Elements of the diagonal logit tiles computed at once (per lax.map step); bounds memory.
_TILE_ELEMENTS = 1 << 25


def diagonal_logits(q, k, key_mask, config: BAConfig) -> tuple[jax.Array, jax.Array]:
    """Under a token-causal mask: per block pair on the diagonal, the mean logit over the (real query,
    valid key) pairs with key position <= query position, and the number of such keys a real query of
    the block sees on average. Both [B, Hq, Nq, Nk] float32, 0 off the diagonal.

    The diagonal key blocks of query block ``a`` are ``a*bq // bk`` and the ``max(1, bq // bk) - 1``
    after it; their logits against the block's queries are one [bq, max(bq, bk)] tile per query block,
    computed a few query blocks at a time.
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bq, bk = config.block_q, config.block_k
    nq, nk = config.num_blocks(lq, lk)
    slots = max(1, bq // bk)
    width = slots * bk
    chunk = max(1, min(nq, _TILE_ELEMENTS // max(b * hq * bq * width, 1)))
    n_chunks = -(-nq // chunk)
    nq_pad = n_chunks * chunk
    first = (np.arange(nq_pad) * bq) // bk  # first diagonal key block of each query block
    # Keys padded so that every window [first*bk, first*bk + width) exists; padding is invalid.
    lk_pad = max(-(-lk // width) * width, int(first[-1]) * bk + width)
    if key_mask is None:
        valid = jnp.ones((b, lk), jnp.bool_)
    else:  # masked keys are zeroed so that whatever they hold stays out of the products
        valid = key_mask
        k = jnp.where(valid[:, :, None, None], k, jnp.zeros((), k.dtype))
    k = jnp.pad(k, ((0, 0), (0, lk_pad - lk), (0, 0), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (0, lk_pad - lk)))
    q = jnp.pad(q, ((0, 0), (0, nq_pad * bq - lq), (0, 0), (0, 0))).reshape(b, nq_pad, bq, hkv, group, d)
    if bq >= bk:  # the windows tile the keys: a reshape, no copy
        k_win = k[:, : nq_pad * bq].reshape(b, nq_pad, width, hkv, d)
        valid_win = valid[:, : nq_pad * bq].reshape(b, nq_pad, width)
    else:  # a query block sits inside one key block
        k_win = jnp.take(k.reshape(b, -1, bk, hkv, d), jnp.asarray(first), axis=1)
        valid_win = jnp.take(valid.reshape(b, -1, bk), jnp.asarray(first), axis=1)
    precision = HIGHEST if q.dtype in (jnp.float32, jnp.float64) else None

    def one_chunk(c):
        take = lambda x: lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)
        a = c * chunk + jnp.arange(chunk)
        q_pos = a[:, None] * bq + jnp.arange(bq)  # [chunk, bq]
        k_pos = (a * bq // bk * bk)[:, None] + jnp.arange(width)  # [chunk, width]
        live = (k_pos[:, None, :] <= q_pos[:, :, None]) & (q_pos[:, :, None] < lq)
        live = live[None] & take(valid_win)[:, :, None, :]  # [B, chunk, bq, width]
        s = jnp.einsum("bcqhgd,bckhd->bchgqk", take(q), take(k_win), precision=precision,
                       preferred_element_type=jnp.promote_types(q.dtype, jnp.float32)).astype(jnp.float32)
        total = jnp.sum(jnp.where(live[:, :, None, None], s, 0.0), axis=-2)  # [B, chunk, Hkv, G, width]
        total = jnp.sum(total.reshape(b, chunk, hq, slots, bk), axis=-1)
        pairs = jnp.sum(live, axis=2).reshape(b, chunk, slots, bk).sum(-1).astype(jnp.float32)
        return total / math.sqrt(d), pairs

    total, pairs = jax.lax.map(one_chunk, jnp.arange(n_chunks))  # [n_chunks, B, chunk, ...]
    total = jnp.moveaxis(total, 0, 1).reshape(b, nq_pad, hq, slots)[:, :nq]
    pairs = jnp.moveaxis(pairs, 0, 1).reshape(b, nq_pad, slots)[:, :nq]
    real_rows = np.minimum(bq, lq - np.arange(nq) * bq).astype(np.float32)
    mean = total / jnp.maximum(pairs, 1.0)[:, :, None, :]  # [B, Nq, Hq, slots]
    per_row = pairs / real_rows[None, :, None]  # [B, Nq, slots]
    # Scatter the slots to their key-block columns (columns past Nk hold only padding: dropped).
    onehot = jnp.asarray((first[:nq, None] + np.arange(slots))[:, :, None] == np.arange(nk), jnp.float32)
    mean = jnp.einsum("bahs,asn->bhan", mean, onehot, precision=HIGHEST)
    per_row = jnp.einsum("bas,asn->ban", per_row, onehot, precision=HIGHEST)
    return mean, jnp.broadcast_to(per_row[:, None], mean.shape)
