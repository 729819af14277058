"""Tail compensation: a pooled estimate of the key blocks a selection drops.

Block-sparse attention normalises over the kept key blocks only, so the mass of every
dropped block is lost. Tail compensation gives each query, for every dropped key group
``g`` (a whole key block, or a sub-block of ``group`` tokens), the term one pooled key
would contribute:

    numerator   += n_g * exp(t * scale * q . kbar_g) * vbar_g
    denominator += n_g * exp(t * scale * q . kbar_g)

where ``n_g`` counts the real keys of the group and ``kbar_g`` / ``vbar_g`` are their mean
key and value. ``t`` is a temperature (1 by default; one per query head allowed). The
pooled term is the exact group mass when the group's logits are equal and, by Jensen's
inequality, less than it otherwise, so ``t > 1`` can make up part of the shortfall.

Padding and masked keys never enter a count or a mean. Under a causal or block-causal
mask a group adds to a query only when the mask lets that query see every key of the
group, so no future key enters either; the selectors always keep the blocks the mask
cuts, so no visible dropped key is lost that way. With every block kept nothing is
dropped and the output is block-sparse attention's.

``refine=m`` (with ``group`` smaller than the key block) pools in sub-blocks only the
``m`` dropped blocks of each query block that score highest (query-block mean against
block mean, plus log count), and the other dropped blocks in one key each: part of the
gain of sub-blocks at a fraction of their cost.

``baatt.attention(config=BAConfig(tail="pooled"))`` runs ``add_pooled_tail`` after the
sparse operator of any implementation: the tail is plain JAX, combined with the
operator's (out, lse) in log space, so gradients flow through both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from baatt import layout
from baatt.reference.attention import block_sparse_attention
from baatt.selection.types import BlockSelection

HIGHEST = jax.lax.Precision.HIGHEST
# Logit elements [B, Hq, query blocks, block_q, pooled keys] computed at once; more query blocks are
# visited in turns, so long sequences never hold an [L, L / group] matrix per head.
_CHUNK_ELEMENTS = 1 << 26


def _acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def group_statistics(x: jax.Array, valid: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """Mean over the valid tokens of each group of ``group`` consecutive rows, and their count.

    x [B, H, N*group, D], valid bool [B, H, N*group]. Returns mean [B, H, N, D] (0 for an
    empty group) and count [B, H, N], in float32 (float64 for float64 x). Invalid rows are
    zeroed before the sum, so NaN stored there never reaches a mean or a gradient.
    """
    acc = _acc_dtype(x.dtype)
    xg = layout.block_view(x.astype(acc), group)
    vg = layout.block_view(valid, group)[..., None]
    count = jnp.sum(vg, axis=-2, dtype=acc)
    return jnp.sum(jnp.where(vg, xg, 0.0), axis=-2) / jnp.maximum(count, 1.0), count[..., 0]


def _merge(out_a, lse_a, out_b, lse_b):
    """Softmax attention over two disjoint key sets from each one's normalised output and log-sum-exp.

    out [..., Dv], lse [...] (same leading shape). A side with lse -inf (no key) counts for
    nothing; with both -inf the output is 0 and the lse -inf. Computed in log space (no exp of
    an lse alone), in float32 (float64 for float64 inputs); the output takes out_a's dtype.
    """
    acc = jnp.promote_types(_acc_dtype(out_a.dtype), lse_a.dtype)
    lse_a, lse_b = lse_a.astype(acc), lse_b.astype(acc)
    top = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    # exp(-inf) is 0 with a zero gradient: an empty side drops out of values and gradients alike.
    w_a, w_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)
    total = w_a + w_b
    has_keys = total > 0
    safe_total = jnp.where(has_keys, total, 1.0)
    lse = jnp.where(has_keys, top + jnp.log(safe_total), -jnp.inf)
    out = (w_a / safe_total)[..., None] * out_a.astype(acc) + (w_b / safe_total)[..., None] * out_b.astype(acc)
    return out.astype(out_a.dtype), lse


def merge_partial(out_a, lse_a, out_b, lse_b):
    """``_merge`` in the layout of ``baatt.attention``: out [B, L, H, Dv], lse [B, H, L]."""
    heads_last = lambda lse: jnp.swapaxes(lse, 1, 2)
    out, lse = _merge(out_a, heads_last(lse_a), out_b, heads_last(lse_b))
    return out, heads_last(lse)


def _softmax_terms(logits, live, values):
    """(lse [B, H, Q], out [B, H, Q, Dv]) of ``softmax(logits)`` over the live pooled keys.

    logits [B, H, Q, P], live bool broadcastable to it, values [B, H, P, Dv]. A row without
    a live entry gets lse -inf and output 0, with finite gradients.
    """
    top = jax.lax.stop_gradient(jnp.max(jnp.where(live, logits, -jnp.inf), axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.exp(jnp.where(live, logits - top, -jnp.inf))
    total = jnp.sum(p, axis=-1)
    has_terms = total > 0
    safe_total = jnp.where(has_terms, total, 1.0)
    lse = jnp.where(has_terms, top[..., 0] + jnp.log(safe_total), -jnp.inf)
    out = jnp.einsum("bhqp,bhpd->bhqd", p, values, precision=HIGHEST) / safe_total[..., None]
    return lse, out


def _temperatures(temperature, q_heads: int, dtype) -> jax.Array:
    """[Hq] temperature per query head from a number, or from ``Hq`` of them (a sequence or an array)."""
    t = jnp.asarray(temperature, dtype)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != q_heads):
        raise ValueError(f"tail temperature must be one number or one per query head ({q_heads}); got shape "
                         f"{t.shape}")
    return jnp.broadcast_to(t, (q_heads,))


def pooled_tail(space: layout.BlockSpace, selection: BlockSelection, *, scale: float, group: int | None = None,
                refine: int = 0, temperature: float | Sequence[float] = 1.0) -> tuple[jax.Array, jax.Array]:
    """The pooled contribution of the key blocks ``selection`` drops, per query, in block space.

    space: Q/K/V of a ``baatt.layout.BlockSpace`` in the selection's block space (its
      permutations, block sizes and mask). group: tokens per pooled key (None: the key
      block); it must divide the key block. refine: with ``group``, the number of dropped
      blocks per query block pooled in groups (0: all of them); the others are pooled in
      one key each. temperature: multiplies the pooled logits (one number, or one per
      query head; an array may be traced).

    Returns (out [B, Hq, Lq_pad, Dv], lse [B, Hq, Lq_pad]), float32 (float64 for float64
    inputs): the normalised pooled output and the log of the pooled denominator; lse is
    -inf for a query with nothing dropped that it may see.
    """
    bq, bk = space.block_q, space.block_k
    group = bk if group is None else group
    if group < 1 or bk % group:
        raise ValueError(f"tail group must divide the key block size ({bk}); got {group}")
    if refine < 0 or (refine and group == bk):
        raise ValueError(f"tail refine must be 0, or >= 1 with a group smaller than the key block ({bk}); "
                         f"got refine={refine}, group={group}")
    acc = _acc_dtype(space.q.dtype)
    batch, q_heads, length_q, _ = space.q.shape
    nq, nk, per_block = space.num_q_blocks, space.num_k_blocks, bk // group
    to_q_heads = lambda x: jnp.take(x, layout.head_map(q_heads, space.k.shape[1]), axis=1)
    k_mean, count = (to_q_heads(x) for x in group_statistics(space.k, space.kv_valid, group))
    v_mean, _ = group_statistics(space.v, space.kv_valid, group)
    v_mean = to_q_heads(v_mean)
    # The scale and the temperature go on the pooled keys once: logits are then plain dot products.
    factor = scale * _temperatures(temperature, q_heads, acc)[None, :, None, None]
    k_mean = k_mean * factor
    log_count = jnp.where(count > 0, jnp.log(jnp.maximum(count, 1.0)), -jnp.inf)  # [B, Hq, Nk*per_block]
    kept = selection.kept_mask(nk)  # [B, Hq, Nq, Nk]
    qb = layout.block_view(space.q.astype(acc), bq)  # [B, Hq, Nq, bq, D]
    q_valid = space.q_valid.reshape(batch, nq, bq)
    # Under a causal mask (rows and keys stay positional): the first key position each query row may
    # not see, and one past the last real key of each group; a row takes a group whose end is within its limit.
    causal = not space.mask.is_bidirectional
    key_limit = (space.mask.key_limit(jnp.arange(nq * bq)).reshape(nq, bq) if causal
                 else jnp.zeros((nq, bq), jnp.int32))
    key_end = jnp.where(space.kv_valid, jnp.arange(nk * bk) + 1, 0)
    group_end = to_q_heads(jnp.max(key_end.reshape(key_end.shape[:2] + (nk * per_block, group)), axis=-1))

    # Whole-block statistics, for the ranking of ``refine`` and the blocks it leaves in one key.
    if group < bk:
        block_count = jnp.sum(count.reshape(batch, q_heads, nk, per_block), axis=-1)
        block_mean = (jnp.sum((k_mean * count[..., None]).reshape(batch, q_heads, nk, per_block, -1), axis=-2)
                      / jnp.maximum(block_count, 1.0)[..., None])
        block_v = (jnp.sum((v_mean * count[..., None]).reshape(batch, q_heads, nk, per_block, -1), axis=-2)
                   / jnp.maximum(block_count, 1.0)[..., None])
        block_log_count = jnp.where(block_count > 0, jnp.log(jnp.maximum(block_count, 1.0)), -jnp.inf)
        block_end = jnp.max(group_end.reshape(batch, q_heads, nk, per_block), axis=-1)

    def one_query_block(args):
        q_a, kept_a, valid_a, limit_a = args  # [B, Hq, bq, D], [B, Hq, Nk], [B, bq], [bq]
        dropped = ~kept_a

        def seen(ends):
            """bool [..., bq, P]: each query row may see every key of the pooled keys ending at ``ends`` [..., P]."""
            return ends[..., None, :] <= limit_a[:, None] if causal else True

        if group == bk or not refine:
            # Every dropped block in groups (one group per block when group == bk).
            logits = jnp.einsum("bhqd,bhpd->bhqp", q_a, k_mean, precision=HIGHEST) + log_count[:, :, None, :]
            live = (jnp.repeat(dropped, per_block, axis=-1) & (count > 0))[:, :, None, :]
            live = live & seen(group_end)
            return _softmax_terms(logits, live, v_mean)
        # The ``refine`` highest-scoring dropped blocks in groups, the other dropped blocks in one key each.
        q_mean = (jnp.sum(jnp.where(valid_a[:, None, :, None], q_a, 0.0), axis=-2)
                  / jnp.maximum(jnp.sum(valid_a, axis=-1), 1)[:, None, None])  # [B, Hq, D]
        rank = jnp.einsum("bhd,bhnd->bhn", q_mean, block_mean, precision=HIGHEST) + block_log_count
        rankable = dropped & (block_count > 0)
        if causal:  # blocks the last row of the query block sees whole
            rankable = rankable & (block_end <= limit_a[-1])
        top_score, top = jax.lax.top_k(jnp.where(rankable, rank, -jnp.inf), min(refine, nk))  # [B, Hq, m]
        refined = jnp.isfinite(top_score)
        is_refined = jnp.any(jax.nn.one_hot(top, nk, dtype=jnp.bool_) & refined[..., None], axis=-2)
        coarse_logits = (jnp.einsum("bhqd,bhnd->bhqn", q_a, block_mean, precision=HIGHEST)
                         + block_log_count[:, :, None, :])
        coarse_live = (dropped & (block_count > 0) & ~is_refined)[:, :, None, :] & seen(block_end)
        coarse = _softmax_terms(coarse_logits, coarse_live, block_v)
        gather = lambda x: jnp.take_along_axis(  # [B, Hq, Nk*per_block, ...] -> [B, Hq, m*per_block, ...]
            x.reshape((batch, q_heads, nk, per_block) + x.shape[3:]), top.reshape(top.shape + (1,) * (x.ndim - 2)),
            axis=2).reshape((batch, q_heads, -1) + x.shape[3:])
        fine_count = gather(count)
        fine_logits = (jnp.einsum("bhqd,bhpd->bhqp", q_a, gather(k_mean), precision=HIGHEST)
                       + jnp.where(fine_count > 0, jnp.log(jnp.maximum(fine_count, 1.0)), -jnp.inf)[:, :, None, :])
        fine_live = jnp.repeat(refined, per_block, axis=-1) & (fine_count > 0)
        fine_live = fine_live[:, :, None, :] & seen(gather(group_end))
        fine = _softmax_terms(fine_logits, fine_live, gather(v_mean))
        out, lse = _merge(coarse[1], coarse[0], fine[1], fine[0])
        return lse, out

    pooled_keys = nk * per_block if not refine else nk + min(refine, nk) * per_block
    per_query_block = batch * q_heads * bq * pooled_keys
    chunk = max(1, min(nq, _CHUNK_ELEMENTS // max(per_query_block, 1)))
    xs = (jnp.moveaxis(qb, 2, 0), jnp.moveaxis(kept, 2, 0), jnp.moveaxis(q_valid, 1, 0), key_limit)
    lse, out = jax.lax.map(one_query_block, xs, batch_size=chunk)  # [Nq, B, Hq, bq], [Nq, B, Hq, bq, Dv]
    lse = jnp.moveaxis(lse, 0, 2).reshape(batch, q_heads, length_q)
    out = jnp.moveaxis(out, 0, 2).reshape(batch, q_heads, length_q, -1)
    return out, lse


def add_pooled_tail(q, k, v, out, lse, selection: BlockSelection, *, key_mask=None, scale: float,
                    group: int | None = None, refine: int = 0, temperature: float | Sequence[float] = 1.0):
    """Block-sparse (out, lse) with the pooled tail of ``selection`` added, in positional layout.

    q [B, Lq, Hq, D], k / v [B, Lk, Hkv, D]; out [B, Lq, Hq, Dv] and lse [B, Hq, Lq] from a
    sparse operator run on ``selection`` (any implementation); key_mask as ``baatt.attention``
    (keys no query may see already marked). Options as ``pooled_tail``. Returns (out, lse)
    of the same shapes, out in out's dtype.
    """
    space = layout.to_block_space(q, k, v, block_q=selection.block_q, block_k=selection.block_k,
                                  key_mask=key_mask, q_perm=selection.q_perm, k_perm=selection.k_perm,
                                  mask=selection.mask)
    tail_out, tail_lse = pooled_tail(space, selection, scale=scale, group=group, refine=refine,
                                     temperature=temperature)
    tail_out, tail_lse = layout.from_block_space(tail_out, tail_lse, length_q=q.shape[1], q_perm=selection.q_perm)
    return merge_partial(out, lse, tail_out, tail_lse)


def tail_compensated_attention(q, k, v, selection: BlockSelection, *, key_mask=None, scale: float | None = None,
                               group: int | None = None, refine: int = 0,
                               temperature: float | Sequence[float] = 1.0):
    """Exact attention over the kept blocks of ``selection`` plus the pooled tail of the dropped ones.

    The specification of ``baatt.attention(config=BAConfig(tail="pooled", ...))``: the
    streaming block-sparse reference in float32, then ``add_pooled_tail``. Arguments as
    ``baatt.reference.block_sparse_attention``, options as ``pooled_tail``.

    Returns out [B, Lq, Hq, Dv] (q's dtype) and lse [B, Hq, Lq].
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = block_sparse_attention(q, k, v, selection, key_mask=key_mask, scale=scale)
    return add_pooled_tail(q, k, v, out, lse, selection, key_mask=key_mask, scale=scale, group=group,
                           refine=refine, temperature=temperature)
